"""A structured (json_schema), seeded request survives its decode worker's death: with one
prefill and two decode workers (separate processes, file discovery), the stream whose
decode worker is SIGKILLed mid-way migrates, the next decode worker rebuilds the grammar
from the output so far, and the client gets the same valid JSON as an undisturbed run."""

from __future__ import annotations

import json
import signal

import httpx
import jsonschema
import pytest

from live_server import start_frontend
from workers import start_worker

# Slow (a cluster whose decode worker is killed mid-stream: minutes on 2 cores): run by
# `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

TTL = ("--discovery-ttl", "2")
ENGINE = ("--max-model-len", "1024", "--served-model-name", "tiny")
# Long enough (about 400 tokens of the tiny model's byte tokenizer) to kill mid-way.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 12},
    "steps": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]},
              "minItems": 40, "maxItems": 40}}, "required": ["title", "steps"]}
BODY = {"prompt": "A plan:", "max_tokens": 600, "temperature": 0.8, "seed": 99, "logprobs": 0,
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "plan", "schema": SCHEMA}}}


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("migration-structured")
    discovery = f"file:{workdir / 'discovery'}"
    args = ("--discovery", discovery, *TTL, *ENGINE)
    procs = {"prefill": start_worker("prefill", tiny_llama_dir, workdir, *args),
             "decode-0": start_worker("decode", tiny_llama_dir, workdir, *args, name="decode-0"),
             "decode-1": start_worker("decode", tiny_llama_dir, workdir, *args, name="decode-1")}
    frontend = start_frontend(workdir, discovery, *TTL)
    try:
        frontend.wait_health(200)
        yield frontend, procs
    finally:
        frontend.stop()
        for proc in procs.values():
            proc.stop()


def _stream(frontend, on_tokens=None) -> tuple[str, str]:
    text, reason, num_tokens = [], None, 0
    with httpx.stream("POST", f"{frontend.base_url}/v1/completions", json=BODY, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            choice = event["choices"][0]
            text.append(choice["text"])
            reason = choice["finish_reason"] or reason
            num_tokens += len((choice["logprobs"] or {}).get("tokens") or [])
            if on_tokens is not None:
                on_tokens(num_tokens)
    return "".join(text), reason


def test_a_structured_request_migrated_mid_stream_is_unchanged(cluster):
    frontend, workers = cluster
    undisturbed, reason = _stream(frontend)
    assert reason == "stop"
    jsonschema.validate(json.loads(undisturbed), SCHEMA)
    killed = []

    def kill_its_decode_worker(num_tokens: int) -> None:
        if killed or num_tokens < 40:
            return
        name = next(n for n, w in workers.items() if n.startswith("decode")
                    and w.metric("splitserve_num_requests_running") == 1)
        workers[name].process.send_signal(signal.SIGKILL)
        workers[name].process.wait(10)
        killed.append(name)

    text, reason = _stream(frontend, kill_its_decode_worker)
    assert killed and "migrating after" in frontend.log()
    assert (text, reason) == (undisturbed, "stop")
