"""Frontend and workers through a real etcd: the frontend finds the workers there, and a
SIGKILLed decode worker (no deregistration: its lease must lapse) leaves routing within
its TTL plus a margin, while requests keep succeeding on the other one."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from etcd_server import EtcdServer
from live_server import start_frontend
from workers import start_worker

TTL_S = 2
MARGIN_S = 3.0


@pytest.fixture(scope="module")
def etcd():
    server = EtcdServer().start()
    yield server
    server.stop()


def test_a_killed_worker_leaves_routing_within_its_ttl(etcd, tiny_llama_dir, tmp_path):
    args = ("--discovery", etcd.url, "--namespace", "e2e", "--discovery-ttl", str(TTL_S),
            "--max-model-len", "512", "--served-model-name", "tiny")
    workers = [start_worker("prefill", tiny_llama_dir, tmp_path, *args),
               start_worker("decode", tiny_llama_dir, tmp_path, *args, name="decode-0"),
               start_worker("decode", tiny_llama_dir, tmp_path, *args, name="decode-1")]
    frontend = start_frontend(tmp_path, etcd.url, "--namespace", "e2e", "--discovery-ttl", str(TTL_S))
    try:
        frontend.wait_health(200)

        def cluster_ids() -> set[str]:
            return {w["id"] for w in httpx.get(f"{frontend.base_url}/cluster", timeout=10).json()["workers"]}

        deadline = time.monotonic() + 10
        while len(cluster_ids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster_ids() == {w.info.worker_id for w in workers}
        victim = workers[1]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        t0 = time.monotonic()
        while victim.info.worker_id in cluster_ids():
            assert time.monotonic() - t0 < TTL_S + MARGIN_S, "the killed worker is still listed"
            time.sleep(0.1)
        print(f"killed worker left routing after {time.monotonic() - t0:.1f}s (TTL {TTL_S}s)")
        for _ in range(3):
            resp = httpx.post(f"{frontend.base_url}/v1/completions", timeout=60,
                              json={"prompt": "hello", "max_tokens": 3, "temperature": 0})
            assert resp.status_code == 200, resp.text
    finally:
        frontend.stop()
        for w in workers:
            w.stop()
