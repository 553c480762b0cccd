"""The frontend's worker set without worker processes: discovery puts and deletes drive
routing and /health, the KV event feed fills the router's index from /kv_events, the kv
policy then follows cached prefixes, and request ids travel in x-request-id."""

from __future__ import annotations

import asyncio

import httpx
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from splitserve.discovery import Discovery, WatchEvent, WorkerRecord
from splitserve.frontend.app import create_app
from splitserve.frontend.kv_events import KVEventFeed
from splitserve.frontend.routing import RoutePlanner, unavailable_reason
from splitserve.frontend.worker_client import WorkerClient
from splitserve.metrics import FrontendMetrics
from splitserve.router import AllCleared, BlockStored, KVEventBatch, KVIndex, KvPolicy, encode_batch
from splitserve.worker import protocol as p

BLOCK = 4


class QueueDiscovery(Discovery):
    """A registry the test drives: every event it puts is what a watcher sees next."""

    def __init__(self):
        self.events: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

    async def watch(self):
        while (event := await self.events.get()) is not None:
            yield event

    async def close(self):
        self.events.put_nowait(None)

    async def list(self):
        raise AssertionError("the frontend only watches")

    register = update = deregister = list


def _record(worker_id: str, role: str) -> WorkerRecord:
    kv = {"kv_host": "127.0.0.1", "kv_port": 7000} if role == "prefill" else {}
    return WorkerRecord(worker_id=worker_id, role=role, api_url=f"http://{worker_id}",
                        metrics_url=f"http://{worker_id}/metrics", model_name="tiny",
                        state="ready", kv_blocks_total=100, **kv)


def _batch(worker_id: str, hashes: list[int]) -> bytes:
    return encode_batch(KVEventBatch(worker_id, epoch=1, seq=0,
                                     events=[AllCleared(), BlockStored(hashes)])) + b"\n"


class FakeCluster:
    """Healthy workers named by their host; /kv_events of each prefill worker streams a
    snapshot of the blocks in `cached` and then stays open."""

    def __init__(self, roles: dict[str, str], cached: dict[str, list[int]]):
        self.roles, self.cached = roles, cached

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if path == "/health":
            return httpx.Response(200, content=p.encode(p.WorkerHealth("ok")))
        if path == "/info":
            record = _record(host, self.roles[host])
            return httpx.Response(200, content=p.encode(p.WorkerInfo(
                role=record.role, model_name="tiny", model_dir="/m", max_model_len=4096,
                block_size=BLOCK, eos_token_ids=[2], worker_id=host, kv_host=record.kv_host,
                kv_port=record.kv_port)))
        if path == "/kv_events":
            async def stream():
                yield _batch(f"{host}-own-name", self.cached.get(host, []))
                await asyncio.Event().wait()    # live batches would follow
            return httpx.Response(200, content=stream())
        raise AssertionError(f"unexpected {request.method} {request.url}")


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_discovery_puts_and_deletes_drive_routing_and_health():
    async def main():
        discovery = QueueDiscovery()
        fake = FakeCluster({"p0": "prefill", "d0": "decode", "d1": "decode"}, {})
        client = WorkerClient(discovery, poll_interval_s=0.05, transport=httpx.MockTransport(fake))
        await client.start()
        ready = lambda n: len(client.workers()) == n and all(w.ready for w in client.workers())  # noqa: E731
        try:
            assert unavailable_reason(client.workers()) == "no worker is registered in discovery"
            for wid in ("p0", "d0"):
                discovery.events.put_nowait(WatchEvent("put", wid, _record(wid, fake.roles[wid])))
            await _until(lambda: ready(2))
            assert unavailable_reason(client.workers()) is None
            # The last decode worker's registration lapses: gone from routing at once.
            discovery.events.put_nowait(WatchEvent("delete", "d0"))
            await _until(lambda: len(client.workers()) == 1)
            assert unavailable_reason(client.workers()) == "no ready decode worker, and no ready both worker"
            discovery.events.put_nowait(WatchEvent("put", "d1", _record("d1", "decode")))
            await _until(lambda: ready(2))
            assert unavailable_reason(client.workers()) is None
            assert {w.worker_id for w in client.workers()} == {"p0", "d1"}
        finally:
            await client.close()

    asyncio.run(main())


def test_kv_events_feed_the_index_and_the_kv_policy_follows_cached_prefixes():
    prompt_a, prompt_b = list(range(100, 132)), list(range(200, 232))    # 8 blocks each
    index = KVIndex(BLOCK)
    fake = FakeCluster({"p0": "prefill", "p1": "prefill", "d0": "decode"},
                       {"p0": index.block_hashes(prompt_a), "p1": index.block_hashes(prompt_b)})
    metrics = FrontendMetrics(CollectorRegistry())

    async def main():
        discovery = QueueDiscovery()
        feed: list[KVEventFeed] = []
        client = WorkerClient(discovery, poll_interval_s=0.05, transport=httpx.MockTransport(fake),
                              on_change=lambda workers: feed[0].sync(workers))
        feed.append(KVEventFeed(client.http, index))
        await client.start()
        try:
            for wid, role in fake.roles.items():
                discovery.events.put_nowait(WatchEvent("put", wid, _record(wid, role)))
            # Batches are renamed after the worker they came from, whatever they call it.
            await _until(lambda: index.num_blocks("p0") == 8 and index.num_blocks("p1") == 8)
            planner = RoutePlanner(KvPolicy(index), index, metrics)
            # (prompt, the prefill worker holding its prefix, tokens left to compute there)
            for prompt, expected, compute in [(prompt_b + [1, 2], "p1", 2), (prompt_a + [3], "p0", 1),
                                              (prompt_b[:20], "p1", 0)]:
                attempts = planner.route(p.GenerateRequest("r", prompt, p.SamplingParams(max_tokens=1)),
                                         client.workers()).attempts
                assert (attempts[0].prefill.worker_id, attempts[0].compute_tokens) == (expected, compute)
            # p0 leaves discovery: its subscription ends and the index forgets it.
            discovery.events.put_nowait(WatchEvent("delete", "p0"))
            await _until(lambda: index.num_blocks("p0") == 0)
        finally:
            await feed[0].close()
            await client.close()

    asyncio.run(main())
    assert metrics.router_decisions.labels(policy="kv", role="prefill")._value.get() == 3
    assert metrics.router_overlap_blocks._sum.get() == 8 + 8 + 5


def test_request_id_is_taken_from_the_client_or_generated_and_returned():
    with TestClient(create_app(QueueDiscovery())) as http:
        given = http.get("/health", headers={"x-request-id": "client-id.42"})
        assert given.status_code == 503 and given.headers["x-request-id"] == "client-id.42"
        assert given.json() == {"status": "unavailable", "reason": "no worker is registered in discovery"}
        generated = http.post("/v1/completions", json={"prompt": "hi"})
        assert generated.status_code == 503 and len(generated.headers["x-request-id"]) == 32
        bad = http.get("/live", headers={"x-request-id": "two words"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-id"
