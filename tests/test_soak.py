"""64 clients streaming at once against `serve` (1 prefill + 1 decode worker, the embedded
model) for a few minutes (slow suite): every request is answered 200 — slowly, queued
when the decode worker is full — never 503 or 429, and the workers' private memory stays
flat.
"""

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from live_server import child_pids, start_serve

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

CLIENTS = 64
DURATION_S = 150.0
WORDS = "alpha beta gamma delta river stone cloud lamp orchard violet engine harbor".split()


def rss_bytes(pid: int, kind: str = "RssAnon") -> int:
    """Private resident memory by default. (RssShmem grows on a decode worker as it copies
    from more of the prefill worker's shared-memory KV, up to that pool's size: the same
    pages the prefill worker holds, not new memory.)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {kind} for pid {pid}")


def worker_pids(server) -> list[int]:
    cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                for pid in child_pids(server.process.pid)}
    return [pid for pid, argv in cmdlines.items() if b"worker" in argv]


def stream_once(http: httpx.Client, base_url: str, rng: random.Random) -> tuple[int, int]:
    """One streamed chat request; (HTTP status, completion tokens from its usage chunk)."""
    content = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 600)))
    body = {"messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": rng.randint(8, 48), "temperature": 0.7, "seed": rng.randint(0, 10**6),
            "stream_options": {"include_usage": True}}
    with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, 0
        tokens, done = 0, False
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
        assert done, "stream ended without [DONE]"
        return 200, tokens


def test_64_streaming_clients_are_all_answered_and_memory_stays_flat(tmp_path):
    server = start_serve(None, tmp_path)
    try:
        pids = worker_pids(server)
        assert len(pids) == 2, pids
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        stop_at = time.monotonic() + DURATION_S

        def client(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(timeout=900) as http:
                while time.monotonic() < stop_at:
                    status, _ = stream_once(http, server.base_url, rng)
                    with lock:
                        statuses[status] = statuses.get(status, 0) + 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        # Memory after warm-up (pools allocated, every code path run) and at the end.
        time.sleep(DURATION_S / 3)
        warm = {pid: rss_bytes(pid) for pid in pids}
        for t in threads:
            t.join(DURATION_S + 900)
        end = {pid: rss_bytes(pid) for pid in pids}
        assert statuses.get(200, 0) >= CLIENTS and set(statuses) == {200}, statuses
        for pid in pids:
            # Flat: allocator noise, not growth with the number of requests served.
            assert end[pid] <= warm[pid] * 1.10 + (64 << 20), (pid, warm[pid], end[pid])
        for url in server.worker_urls:
            assert server.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=url) == 0
        assert server.frontend_metric("splitserve_requests_rejected_total") == 0
        print(f"\n{CLIENTS} clients, {DURATION_S:.0f}s: {statuses}; RSS MiB warm "
              f"{[w >> 20 for w in warm.values()]} end {[e >> 20 for e in end.values()]}")
    finally:
        server.stop()
