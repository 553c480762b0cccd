"""The kv router over two vLLM workers (`worker --engine vllm --role both`) behind one
frontend: requests sharing a prefix go where vLLM has that prefix cached, because the
workers' KV events (vLLM's, re-hashed into our block hashes) feed the router's index.
Measured by vLLM's own prefix cache: at least 90% of the tokens that could hit do."""

from __future__ import annotations

import random
import signal
import time

import httpx
import pytest

from live_server import descendants, pid_alive, start_frontend
from procs import metric_value, spawn

# Slow (two vLLM servers: minutes to start on 2 cores): run by `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

PREFIX_TOKENS, NUM_PREFIXES, REQUESTS_PER_PREFIX = 256, 2, 4
WORKER_ARGS = ("--engine", "vllm", "--role", "both", "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "1024", "--kv-cache-memory", "128MiB", "--block-size", "32",
               "--threads", "1", "--served-model-name", "smol")


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 40000) for _ in range(PREFIX_TOKENS)]
                for _ in range(NUM_PREFIXES)]
    prompts = [prefix + [rng.randrange(100, 40000) for _ in range(rng.randrange(8, 24))]
               for prefix in prefixes for _ in range(REQUESTS_PER_PREFIX)]
    rng.shuffle(prompts)
    return prompts


def _wait_idle(url: str, timeout: float = 30.0) -> tuple[int, int]:
    """(running requests, KV blocks in use) once both are 0, or as they are at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        s = httpx.get(f"{url}/stats", timeout=10).json()
        got = (s["num_requests_running"], s["kv_blocks_in_use"])
        if got == (0, 0) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _wait_healthy(urls: list[str], procs, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(urls)
    while pending:
        for url, proc in zip(urls, procs):
            assert proc.poll() is None, f"vLLM worker at {url} exited with {proc.poll()}"
            if url in pending:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        pending.discard(url)
                except httpx.HTTPError:
                    pass
        assert time.monotonic() < deadline, f"vLLM workers {pending} not healthy in {timeout}s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(smollm2_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-router")
    discovery = f"file:{workdir / 'discovery'}"
    procs, urls, engine_processes = [], [], []
    try:
        for i in range(2):
            proc, port, _ = spawn(["worker", "--model", str(smollm2_dir), *WORKER_ARGS,
                                   "--discovery", discovery, "--worker-id", f"vllm-{i}"],
                                  workdir, f"vllm-{i}", 120)
            procs.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
        _wait_healthy(urls, procs)
        engine_processes = [c for proc in procs for c in descendants(proc.pid)]
        frontend = start_frontend(workdir, discovery, "--router", "kv")
        try:
            frontend.wait_health(200, timeout=120)
            yield frontend, urls
            for url in urls:
                assert _wait_idle(url) == (0, 0)
        finally:
            frontend.stop()
    finally:
        # A worker stopped by SIGTERM shuts vLLM down first (its engine processes with it),
        # then exits by the signal.
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(60) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (alive := [p for p in engine_processes if pid_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"vLLM processes left behind: {alive}"


def _hits(urls: list[str]) -> tuple[float, float]:
    return (sum(metric_value(f"{u}/metrics", "splitserve_prefix_cache_hits_total") for u in urls),
            sum(metric_value(f"{u}/metrics", "splitserve_prefix_cache_queries_total") for u in urls))


def test_kv_router_sends_shared_prefixes_where_vllm_cached_them(cluster):
    frontend, urls = cluster
    before, _ = _hits(urls)
    with httpx.Client(timeout=300) as http:
        for prompt in _prompts(seed=7):
            resp = http.post(f"{frontend.base_url}/v1/completions",
                             json={"model": "smol", "prompt": prompt, "max_tokens": 1,
                                   "temperature": 0})
            assert resp.status_code == 200, resp.text
    # The stats of a request's last step reach /metrics with vLLM's next stats update.
    could_hit = (REQUESTS_PER_PREFIX - 1) * NUM_PREFIXES * PREFIX_TOKENS
    deadline = time.monotonic() + 30
    while (hits := _hits(urls)[0] - before) < 0.9 * could_hit and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hits >= 0.9 * could_hit, f"{hits} of {could_hit} prefix tokens hit"
