"""A worker started with --discovery registers itself: role, reachable URLs, the KV address
of a prefill worker and its load; marked ready once healthy; withdrawn on SIGTERM; gone
within the TTL when SIGKILLed (a real etcd)."""

import asyncio
import signal
import time

import httpx

from etcd_server import EtcdServer
from splitserve.discovery import parse_discovery
from splitserve.worker import protocol as p_
from workers import start_worker


def records(url: str, **kw) -> dict:
    async def go():
        async with parse_discovery(url, **kw) as d:
            return {r.worker_id: r for r in await d.list()}
    return asyncio.run(go())


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_file_discovery_registers_ready_worker_with_load_and_withdraws_on_sigterm(
        tiny_llama_dir, tmp_path):
    url = f"file:{tmp_path / 'registry'}"
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path, "--discovery", url,
                           "--discovery-ttl", "3", "--worker-id", "p-1")
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--discovery", url,
                          "--discovery-ttl", "3", "--worker-id", "d-1")
    try:
        found = wait_for(lambda: (r := records(url)) and all(x.state == "ready" for x in r.values())
                         and len(r) == 2 and r, 5, "both workers ready")
        p, d = found["p-1"], found["d-1"]
        assert (p.role, d.role) == ("prefill", "decode")
        assert p.api_url == prefill.url and d.api_url == decode.url
        assert p.metrics_url == f"{prefill.url}/metrics"
        assert httpx.get(p.metrics_url, timeout=5).status_code == 200
        assert (p.kv_host, p.kv_port) == (prefill.info.kv_host, prefill.info.kv_port)
        assert d.kv_host is None
        assert p.model_name == prefill.info.model_name and p.model_name
        assert p.kv_blocks_total > 0 and p.kv_blocks_in_use == 0
        # Load is republished (every ttl/3) while a request runs on the decode worker.
        req = p_.GenerateRequest("disc-1", list(range(1, 40)),
                                 p_.SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True),
                                 prefill.target())
        with httpx.stream("POST", f"{decode.url}/generate", content=p_.encode(req), timeout=30,
                          headers={"content-type": "application/json"}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()     # kept: dropping the iterator closes the stream
            next(lines)
            busy = wait_for(lambda: (r := records(url)["d-1"]).num_requests_running == 1 and r,
                            3, "the decode worker's load in its record")
            assert busy.kv_blocks_in_use > 0
        # Leaving the stream aborted the request: its load goes back to nothing.
        wait_for(lambda: records(url)["d-1"].num_requests_running == 0, 3, "the load to clear")

        # (uvicorn re-raises the signal after its graceful shutdown: the exit status is -15.)
        prefill.stop(signal.SIGTERM)
        # Withdrawn at shutdown, not left to lapse: gone well before the 3 s TTL.
        assert set(records(url)) == {"d-1"}
        assert "deregistered p-1" in prefill.log()
        assert "Application shutdown complete" in prefill.log()
    finally:
        prefill.stop()
        decode.stop()


def test_etcd_sigkilled_worker_is_gone_within_ttl(tiny_llama_dir, tmp_path):
    with EtcdServer() as etcd:
        w = start_worker("both", tiny_llama_dir, tmp_path, "--discovery", etcd.url,
                         "--namespace", "t-kill", "--discovery-ttl", "2", "--worker-id", "b-1")
        try:
            found = wait_for(lambda: (r := records(etcd.url, namespace="t-kill")).get("b-1")
                             and r["b-1"].state == "ready" and r, 5, "the worker ready in etcd")
            assert found["b-1"].api_url == w.url
            assert records(etcd.url, namespace="other") == {}
            killed = time.monotonic()
            w.stop(signal.SIGKILL)
            wait_for(lambda: "b-1" not in records(etcd.url, namespace="t-kill"), 2 + 3,
                     "the lease to lapse")
            assert time.monotonic() - killed > 0.5, "removed at once: was it deregistered?"
        finally:
            w.stop()
