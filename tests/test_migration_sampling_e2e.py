"""A seeded, penalised request with logprobs survives its decode worker's death
unchanged: with one prefill and two decode workers (separate processes, file
discovery), a stream whose decode worker is SIGKILLed mid-way migrates and yields the
same text and logprobs as an undisturbed run of the same request (each token's
randomness comes from (seed, position); penalties count the moved output)."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from workers import migration_cluster

# Slow (a cluster whose decode worker is killed mid-stream: minutes on 2 cores): run by
# `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

ENGINE = ("--max-model-len", "1024", "--served-model-name", "tiny")
BODY = {"prompt": "Once upon a time, in a land far away, there lived", "max_tokens": 300,
        "temperature": 0.8, "seed": 1234, "frequency_penalty": 0.4, "repetition_penalty": 1.1,
        "min_tokens": 150, "logprobs": 2, "stream": True}


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("migration-sampling")
    with migration_cluster(tiny_llama_dir, workdir, *ENGINE) as (frontend, procs, _):
        yield frontend, procs


def _stream(frontend, on_event=None) -> tuple[str, list]:
    text, entries = [], []
    with httpx.stream("POST", f"{frontend.base_url}/v1/completions", json=BODY, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            choice = event["choices"][0]
            text.append(choice["text"])
            if choice["logprobs"]:
                lp = choice["logprobs"]
                entries.extend(zip(lp["tokens"], lp["token_logprobs"]))
            if on_event is not None:
                on_event(len(entries))
    return "".join(text), entries


def test_a_seeded_request_migrated_mid_stream_is_unchanged(cluster):
    frontend, workers = cluster
    undisturbed_text, undisturbed = _stream(frontend)
    assert len(undisturbed) >= 150
    killed = []

    def kill_its_decode_worker(num_tokens: int) -> None:
        if killed or num_tokens < 20:
            return
        name = next(n for n, w in workers.items() if n.startswith("decode")
                    and w.metric("splitserve_num_requests_running") == 1)
        workers[name].process.send_signal(signal.SIGKILL)
        workers[name].process.wait(10)
        killed.append(name)

    text, entries = _stream(frontend, kill_its_decode_worker)
    assert killed and "migrating after" in frontend.log()
    assert text == undisturbed_text
    assert [t for t, _ in entries] == [t for t, _ in undisturbed]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(entries, undisturbed))
