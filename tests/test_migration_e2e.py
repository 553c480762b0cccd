"""A cluster of separate processes found through file discovery (one prefill worker, two
decode workers, a frontend), as on Kubernetes: a client's x-request-id shows up in all
three processes' logs; a decode worker SIGKILLed mid-stream is replaced without the
client noticing (greedy text identical to an undisturbed run, usage exact, migration
counted); the frontend's /health turns 503 when the last decode worker goes and 200
when one returns."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from procs import metric_value
from workers import migration_cluster, start_worker

ENGINE = ("--max-model-len", "1024", "--served-model-name", "tiny")
PROMPT = "Once upon a time, in a land far away, there lived"


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("migration")
    with migration_cluster(tiny_llama_dir, workdir, *ENGINE) as (frontend, procs, args):
        yield {"workdir": workdir, "args": args, "frontend": frontend, "workers": procs}


def _completion(frontend, **extra) -> httpx.Response:
    return httpx.post(f"{frontend.base_url}/v1/completions", timeout=120, json={
        "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True, **extra})


def test_a_client_request_id_is_in_the_response_and_every_process_log(cluster):
    frontend, workers = cluster["frontend"], cluster["workers"]
    resp = httpx.post(
        f"{frontend.base_url}/v1/completions", timeout=60, headers={"x-request-id": "trace-7f3a"},
        json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "trace-7f3a"
    # Internally the client's id gets a suffix of its own (clients may reuse an id).
    assert resp.json()["id"].startswith("cmpl-trace-7f3a-")
    decode_logs = workers["decode-0"].log() + workers["decode-1"].log()
    for name, log in [("frontend", frontend.log()), ("decode", decode_logs),
                      ("prefill", workers["prefill"].log())]:
        assert "request_id=trace-7f3a" in log, f"{name} log lacks the request id"


def test_a_decode_worker_killed_mid_stream_is_replaced_transparently(cluster):
    frontend, workers = cluster["frontend"], cluster["workers"]
    undisturbed = _completion(frontend).json()["choices"][0]["text"]
    migrated_before = frontend.metric("splitserve_requests_migrated_total")
    deltas, usage, killed = [], None, None
    with httpx.stream("POST", f"{frontend.base_url}/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            if event["choices"]:
                deltas.append(event["choices"][0]["text"])
            usage = event.get("usage") or usage
            if killed is None and len(deltas) == 20:
                # The one decoding this request: it has a running request.
                killed = next(name for name, w in workers.items() if name.startswith("decode")
                              and w.metric("splitserve_num_requests_running") == 1)
                workers[killed].process.send_signal(signal.SIGKILL)
                workers[killed].process.wait(10)
    assert killed is not None
    assert "".join(deltas) == undisturbed
    assert usage["completion_tokens"] == 300 and usage["prompt_tokens"] > 0
    assert frontend.metric("splitserve_requests_migrated_total") == migrated_before + 1
    assert "migrating after" in frontend.log()


def test_health_follows_the_last_decode_worker_out_and_back(cluster, tiny_llama_dir):
    frontend, workers = cluster["frontend"], cluster["workers"]
    for name in [n for n in workers if n.startswith("decode")]:
        workers.pop(name).stop()            # SIGTERM: deregisters (a killed one lapses)
    t0 = time.monotonic()
    body = frontend.wait_health(503, timeout=10)
    assert body["reason"].startswith("no ready decode worker"), body
    print(f"/health 503 after {time.monotonic() - t0:.1f}s")
    workers["decode-2"] = start_worker("decode", tiny_llama_dir, cluster["workdir"], *cluster["args"],
                                       name="decode-2")
    frontend.wait_health(200, timeout=15)
    assert _completion(frontend, max_tokens=3).status_code == 200
    assert metric_value(f"{frontend.base_url}/metrics", "splitserve_workers", role="decode",
                        state="ready") == 1
