"""Backpressure with real processes (file discovery, one prefill worker, one decode worker
whose KV pool holds three prompts at once, frontends): many concurrent requests are all
answered 200, the ones that found the decode worker full after waiting in the frontend's
queue; with the prefill worker stopped (SIGSTOP), `--prefill-overflow local` answers
from the decode worker alone, counted as `no_prefill_worker`, and `queue` holds the
request until the prefill worker is back — a client that gives up meanwhile leaves the
queue. Every KV block is free afterwards."""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from live_server import start_frontend
from procs import metric_value
from workers import start_worker

TTL = ("--discovery-ttl", "2")
# 24 blocks of 16 tokens (8 KiB each for the tiny model): three 100-token prompts.
ENGINE = ("--max-model-len", "256", "--served-model-name", "tiny", "--kv-cache-memory", str(24 * 8192))


def _prompt(i: int) -> str:
    # ~100 byte tokens, distinct from the first block on, so no prefix is shared.
    return f"{i:03d} " + "".join(chr(97 + (i * 7 + k * 3) % 26) for k in range(95))


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        time.sleep(0.05)
    return result


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("backpressure")
    discovery = f"file:{workdir / 'discovery'}"
    args = ("--discovery", discovery, *TTL, *ENGINE)
    workers = {"prefill": start_worker("prefill", tiny_llama_dir, workdir, *args),
               "decode": start_worker("decode", tiny_llama_dir, workdir, *args)}
    frontends = {"local": start_frontend(workdir, discovery, *TTL, name="frontend-local"),
                 "queue": start_frontend(workdir, discovery, *TTL, "--prefill-overflow", "queue",
                                         name="frontend-queue")}
    try:
        for f in frontends.values():
            f.wait_health(200)
        yield {"workers": workers, "frontends": frontends}
    finally:
        workers["prefill"].process.send_signal(signal.SIGCONT)
        for f in frontends.values():
            f.stop()
        for w in workers.values():
            w.stop()


def _complete(base_url: str, i: int) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", timeout=300, json={
        "prompt": _prompt(i), "max_tokens": 8, "temperature": 0, "ignore_eos": True})


def _blocks_free(workers) -> None:
    for w in workers.values():
        assert w.wait_metric("splitserve_kv_blocks_in_use", 0) == 0, w.log()[-2000:]


def test_many_concurrent_requests_on_a_small_kv_pool_all_succeed_some_after_queueing(cluster):
    frontend, workers = cluster["frontends"]["local"], cluster["workers"]
    assert workers["decode"].metric("splitserve_kv_blocks_total") == 24
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: _complete(frontend.base_url, i), range(16)))
    assert [r.status_code for r in replies] == [200] * 16, [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in replies)
    queued = frontend.metric("splitserve_request_queue_wait_seconds_count")
    print(f"{queued:.0f} of 16 requests waited in the queue")
    assert queued > 0 and frontend.metric("splitserve_requests_queued") == 0
    assert frontend.metric("splitserve_requests_rejected_total") == 0
    # Each prompt's KV came from the prefill worker (none computed locally).
    assert frontend.metric("splitserve_local_prefill_total") == 0
    assert workers["decode"].metric("splitserve_kv_transfers_total") == \
        workers["decode"].metric("splitserve_kv_transfers_total", outcome="ok") >= 16
    assert "queued (" in frontend.log() and "admitted after" in frontend.log()
    _blocks_free(workers)


def _cluster_json(frontend) -> dict:
    return httpx.get(f"{frontend.base_url}/cluster", timeout=10).json()


def _prefill_ready(frontend) -> bool:
    return any(w["role"] == "prefill" and w["state"] == "ready" for w in _cluster_json(frontend)["workers"])


def test_without_a_ready_prefill_worker_the_decode_worker_computes_the_prompt(cluster):
    local, queue = cluster["frontends"]["local"], cluster["frontends"]["queue"]
    workers = cluster["workers"]
    decode = workers["decode"]
    transfers = decode.metric("splitserve_kv_transfers_total")
    workers["prefill"].process.send_signal(signal.SIGSTOP)
    try:
        _wait_for(lambda: not _prefill_ready(local) and not _prefill_ready(queue), what="prefill gone")
        # local: a decode worker alone serves (and /health says so).
        assert local.health()[0] == 200
        replies = [_complete(local.base_url, 100 + i) for i in range(3)]
        assert [r.status_code for r in replies] == [200] * 3
        assert metric_value(f"{local.base_url}/metrics", "splitserve_local_prefill_total",
                            reason="no_prefill_worker") == 3
        assert decode.metric("splitserve_kv_transfers_total") == transfers     # nothing fetched
        request_id = replies[0].headers["x-request-id"]
        assert f"request_id={request_id} sent to {decode.url} (prompt computed there: local " \
               "prefill, no_prefill_worker)" in local.log()
        assert _cluster_json(local)["prefill_overflow"]["local_prefills"]["no_prefill_worker"] == 3
        # queue: the request waits; its client gives up and it leaves the queue.
        assert queue.health()[0] == 503
        _leave_while_queued(queue)
    finally:
        workers["prefill"].process.send_signal(signal.SIGCONT)
    # Back: the queue frontend serves again, through the prefill worker.
    _wait_for(lambda: _prefill_ready(queue), what="prefill back")
    assert _complete(queue.base_url, 200).status_code == 200
    assert decode.metric("splitserve_kv_transfers_total") == transfers + 1
    _blocks_free(workers)


def _leave_while_queued(frontend) -> None:
    host, port = frontend.base_url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": _prompt(300), "max_tokens": 4}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        _wait_for(lambda: frontend.metric("splitserve_requests_queued") == 1, what="queued")
        queue = _cluster_json(frontend)["queue"]
        assert queue["length"] == 1 and queue["oldest_wait_s"] >= 0
    _wait_for(lambda: frontend.metric("splitserve_requests_queued") == 0, what="left the queue")
    _wait_for(lambda: metric_value(f"{frontend.base_url}/metrics", "splitserve_requests_total",
                                   status="499") == 1, what="counted as 499")
    assert "client disconnected before a worker took it" in frontend.log()
