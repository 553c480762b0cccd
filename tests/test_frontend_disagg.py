"""The OpenAI API over a disaggregated cluster, end to end: `splitserve serve` (one
prefill + one decode worker) answers token for token as `serve --aggregated` does, with
the KV transferred rather than recomputed; GET /cluster shows both workers; and the
frontend's /health turns 503, naming what is missing, when the only decode worker dies."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from live_server import start_serve
from splitserve.cli.http_server import HttpServer
from splitserve.discovery import StaticDiscovery, StaticDiscoveryConfig
from splitserve.frontend.app import create_app as create_frontend
from splitserve.frontend.config import FrontendConfig
from procs import metric_value
from workers import start_worker

ARGS = ("--max-model-len", "512", "--served-model-name", "tiny")
CHAT = [{"role": "user", "content": "Tell me a story about a long journey."}]
PROMPT = "Once upon a time, in a land far away,"


def _check_and_stop(srv) -> None:
    try:
        for url in srv.worker_urls:  # nothing may stay allocated after the requests
            assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=url) == 0
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def disagg(tiny_llama_dir, tmp_path_factory):
    srv = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("disagg"), *ARGS)
    yield srv
    _check_and_stop(srv)


@pytest.fixture(scope="module")
def aggregated(tiny_llama_dir, tmp_path_factory):
    srv = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("agg"), "--aggregated", *ARGS)
    yield srv
    _check_and_stop(srv)


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)


def _outputs(srv) -> dict[str, str]:
    """Greedy chat and completion text, whole and streamed."""
    greedy = dict(model="tiny", temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    with _client(srv) as c:
        return {
            "chat": c.chat.completions.create(messages=CHAT, **greedy).choices[0].message.content,
            "chat stream": "".join(ch.choices[0].delta.content or "" for ch in
                                   c.chat.completions.create(messages=CHAT, stream=True, **greedy)),
            "completion": c.completions.create(prompt=PROMPT, **greedy).choices[0].text,
            "completion stream": "".join(ch.choices[0].text for ch in
                                         c.completions.create(prompt=PROMPT, stream=True, **greedy)),
        }


def test_disaggregated_output_is_identical_to_aggregated_and_the_kv_was_transferred(disagg, aggregated):
    ours = _outputs(disagg)
    assert ours == _outputs(aggregated)
    assert len(set(ours.values())) == 2 and all(ours.values())  # chat and completion differ
    # Every request's KV came over the wire: four fetches, all ok (so no fallback).
    (decode,) = disagg.workers["decode"]
    assert metric_value(f"{decode}/metrics", "splitserve_kv_transfers_total") == 4
    assert metric_value(f"{decode}/metrics", "splitserve_kv_transfers_total", outcome="ok") == 4
    assert disagg.log().count("prompt tokens transferred") == 4


def _seeded_outputs(srv) -> dict[str, str]:
    """Sampled (temperature 0.8) chat and completion text with a fixed seed, whole and streamed."""
    seeded = dict(model="tiny", temperature=0.8, top_p=0.95, seed=77, max_tokens=24,
                  extra_body={"ignore_eos": True})
    with _client(srv) as c:
        return {
            "chat": c.chat.completions.create(messages=CHAT, **seeded).choices[0].message.content,
            "chat stream": "".join(ch.choices[0].delta.content or "" for ch in
                                   c.chat.completions.create(messages=CHAT, stream=True, **seeded)),
            "completion": c.completions.create(prompt=PROMPT, **seeded).choices[0].text,
            "completion stream": "".join(ch.choices[0].text for ch in
                                         c.completions.create(prompt=PROMPT, stream=True, **seeded)),
        }


def test_a_seed_gives_the_same_sampled_text_disaggregated_as_aggregated(disagg, aggregated):
    # The prefill worker samples the first token, the decode worker the rest: each token's
    # randomness comes from (seed, position), so the split changes nothing.
    ours = _seeded_outputs(disagg)
    assert ours == _seeded_outputs(aggregated)
    assert ours["chat"] == ours["chat stream"] and ours["completion"] == ours["completion stream"]
    assert ours["chat"] != _outputs(aggregated)["chat"]      # really sampled, not greedy


def test_cluster_lists_both_workers_with_roles_and_kv_address(disagg):
    cluster = disagg.cluster()
    assert (cluster["status"], cluster["reason"]) == ("ok", None)
    by_role = {w["role"]: w for w in cluster["workers"]}
    assert sorted(by_role) == ["decode", "prefill"]
    for role, w in by_role.items():
        assert w["state"] == "ready" and w["reason"] is None and w["id"]
        assert w["api_url"] == disagg.workers[role][0]
        assert w["metrics_url"] == f"{w['api_url']}/metrics"
        assert abs(w["last_healthy"] - time.time()) < 30
    assert by_role["decode"]["kv_address"] is None
    host, port = by_role["prefill"]["kv_address"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert httpx.get(f"{disagg.base_url}/health").json() == {"status": "ok"}


def _wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
    return result


def test_frontend_health_is_503_naming_the_missing_decode_worker_when_it_dies(tiny_llama_dir, tmp_path):
    # Separate processes, not `serve`: serve stops everything when a child dies.
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path)
    decode = start_worker("decode", tiny_llama_dir, tmp_path)
    static = StaticDiscovery(StaticDiscoveryConfig((prefill.url, decode.url)))
    # A short queue wait: a request waits for a decode worker to come back, then gets 503.
    server = HttpServer(create_frontend(static, FrontendConfig(queue_timeout_s=1.0)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        _wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)
        decode.stop(signal.SIGKILL)
        health = _wait_for(lambda: (r := httpx.get(f"{url}/health")).status_code == 503 and r.json())
        assert health["reason"].startswith("no ready decode worker, and no ready both worker (worker "
                                           f"{decode.url} (decode): unreachable: ")
        (entry,) = [w for w in httpx.get(f"{url}/cluster").json()["workers"] if w["role"] == "decode"]
        assert entry["state"] == "unreachable" and entry["last_healthy"] is not None
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "no ready decode worker" in r.json()["error"]["message"]
        assert "within 1s (the queue's wait limit)" in r.json()["error"]["message"]
    finally:
        server.request_exit()
        thread.join(15)
        prefill.stop()
