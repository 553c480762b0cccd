"""Backpressure instead of 503, against faked workers: a request no decode worker can take
waits in the admission queue in arrival order and is admitted when a finished request
frees room; a full queue answers 429, the wait limit 503 with the last refusal; a client
that leaves while queued leaves the queue. And the prefill overflow policy: with no
prefill worker ready, or every one saturated, `local` sends the request to a decode
worker without a prefill target (counted by reason), `queue` waits for a prefill worker."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from splitserve.discovery import StaticDiscovery, StaticDiscoveryConfig, WorkerRecord
from splitserve.frontend.admission import AdmissionQueue
from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.generation import Generation
from splitserve.frontend.routing import Attempt, RoutePlanner
from splitserve.frontend.worker_client import WorkerClient
from splitserve.frontend.workers import WorkerState, WorkerStatus
from splitserve.metrics import FrontendMetrics
from splitserve.router import KVIndex, RoundRobinPolicy
from splitserve.worker import protocol as p

CAPACITY = p.WorkerError("cannot reserve 1 KV blocks (0 of 4 free)", code="capacity")


def _info(role: str, name: str) -> p.WorkerInfo:
    kv_host, kv_port = ("127.0.0.1", 7000) if role == "prefill" else (None, None)
    return p.WorkerInfo(role=role, model_name="tiny", model_dir="/m", max_model_len=64,
                        block_size=16, eos_token_ids=[2], worker_id=name, kv_host=kv_host,
                        kv_port=kv_port)


class SlotWorkers:
    """A prefill worker p0 and decode workers with `slots` requests' room each: a decode
    worker answers 503 capacity when full; a request it takes streams one token once the
    test releases it, then frees its slot. Records the order requests were taken in."""

    def __init__(self, slots: dict[str, int], token: int):
        self.roles = {"p0": "prefill", **{d: "decode" for d in slots}}
        self.slots, self.token = dict(slots), token
        self.taken: list[str] = []
        self.refused: list[str] = []
        self.bodies: list[dict] = []
        self.release: dict[str, asyncio.Event] = {}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/health":
            return httpx.Response(200, content=p.encode(p.WorkerHealth("ok")))
        if request.url.path == "/info":
            return httpx.Response(200, content=p.encode(_info(self.roles[host], host)))
        body = json.loads(request.content)
        if self.slots[host] == 0:
            self.refused.append(body["request_id"])
            return httpx.Response(503, content=p.encode(CAPACITY))
        self.slots[host] -= 1
        self.taken.append(body["request_id"])
        self.bodies.append(body)
        release = self.release.setdefault(body["request_id"], asyncio.Event())

        async def stream():
            await release.wait()
            self.slots[host] += 1       # a finished request's blocks are free at once
            yield p.encode_line(p.GenerateChunk(new_token_ids=[self.token], finish_reason="length"))
        return httpx.Response(200, content=stream())


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


class Cluster:
    """A frontend's request path (client, planner, queue) over SlotWorkers."""

    def __init__(self, fake: SlotWorkers, tokenizer, max_queued: int = 8, timeout_s: float = 60.0,
                 overflow: str = "local"):
        self.fake, self.tokenizer = fake, tokenizer
        self.metrics = FrontendMetrics(CollectorRegistry())
        self.queue = AdmissionQueue(max_queued, timeout_s, self.metrics)
        self.planner = RoutePlanner(RoundRobinPolicy(), KVIndex(16), self.metrics, overflow,
                                    on_settle=self.queue.notify)
        self.client = WorkerClient(StaticDiscovery(StaticDiscoveryConfig(
            tuple(f"http://{h}:1" for h in fake.roles))), poll_interval_s=60,
            transport=httpx.MockTransport(fake), on_change=lambda _: self.queue.notify())

    async def __aenter__(self):
        await self.client.start()
        await _until(lambda: len(self.client.workers()) == len(self.fake.roles)
                     and all(w.ready for w in self.client.workers()))
        return self

    async def __aexit__(self, *exc):
        await self.client.close()

    def request(self, request_id: str) -> asyncio.Task:
        """Start one request; the task returns its text or the OpenAIError."""
        gen = Generation(self.client, self.planner, self.tokenizer, self.metrics,
                         p.GenerateRequest(request_id, [5, 6, 7], p.SamplingParams(max_tokens=1)), [],
                         time.monotonic(), admission=self.queue)

        async def run():
            try:
                await gen.start()
                return "".join([d.text async for d in gen.deltas()])
            except OpenAIError as e:
                return e
        return asyncio.create_task(run(), name=request_id)

    async def queued(self, request_id: str, n: int) -> asyncio.Task:
        """Start a request and wait until the queue holds n requests (so arrival order is
        the order of these calls, whatever the event loop does)."""
        task = self.request(request_id)
        await _until(lambda: len(self.queue) == n)
        return task

    def rejected(self, reason: str) -> float:
        return self.metrics.requests_rejected.labels(reason=reason)._value.get()


async def _until(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def test_requests_wait_in_arrival_order_and_are_admitted_as_room_frees(tokenizer):
    token = tokenizer.encode("Hi", add_special_tokens=False)[0]
    fake = SlotWorkers({"d0": 1}, token)

    async def main():
        async with Cluster(fake, tokenizer) as c:
            first = c.request("r0")
            await _until(lambda: fake.taken == ["r0"])
            waiting = [await c.queued(f"r{i}", i) for i in (1, 2, 3)]
            assert c.metrics.requests_queued._value.get() == 3
            assert c.queue.snapshot()["length"] == 3 and c.queue.snapshot()["oldest_wait_s"] >= 0
            # Each finished request frees the one slot for the oldest waiter, never a later one.
            for i, task in enumerate([first, *waiting]):
                fake.release[f"r{i}"].set()
                assert await asyncio.wait_for(task, 20) == tokenizer.decode([token])
                if i < 3:
                    await _until(lambda: len(fake.taken) == i + 2)
            assert fake.taken == ["r0", "r1", "r2", "r3"]
            # Later arrivals queued behind the head without trying while it waited.
            assert fake.refused[0] == "r1" and "r3" not in fake.refused[:fake.refused.index("r2")]
            assert (len(c.queue), c.metrics.requests_queued._value.get()) == (0, 0)
            assert c.metrics.request_queue_wait._sum.get() > 0
            return c.metrics

    metrics = asyncio.run(main())
    assert metrics.requests.labels(status="200")._value.get() == 4


def test_a_full_queue_answers_429_and_the_wait_limit_503_with_the_last_refusal(tokenizer):
    fake = SlotWorkers({"d0": 1, "d1": 0}, 1)

    async def main():
        async with Cluster(fake, tokenizer, max_queued=1, timeout_s=1.0) as c:
            holder = c.request("r0")
            await _until(lambda: fake.taken == ["r0"])
            waiter = await c.queued("r1", 1)
            full = await asyncio.wait_for(c.request("r2"), 20)
            assert isinstance(full, OpenAIError) and full.status == 429
            assert full.message.startswith("the server is at capacity and its queue is full "
                                           "(1 requests waiting): waiting behind 1 earlier request(s)")
            assert full.body()["error"]["code"] == 429
            timed_out = await asyncio.wait_for(waiter, 20)
            assert isinstance(timed_out, OpenAIError) and timed_out.status == 503
            assert timed_out.message.startswith("no worker could take the request within 1s (the "
                                                "queue's wait limit): worker http://d0:1 is full: ")
            assert "worker http://d1:1 is full: cannot reserve" in timed_out.message
            assert (c.rejected("queue_full"), c.rejected("queue_timeout")) == (1, 1)
            assert len(c.queue) == 0
            fake.release["r0"].set()
            assert await holder is not None

    asyncio.run(main())


def test_a_client_that_leaves_while_queued_leaves_the_queue(tokenizer):
    fake = SlotWorkers({"d0": 1}, 1)

    async def main():
        async with Cluster(fake, tokenizer) as c:
            holder = c.request("r0")
            await _until(lambda: fake.taken == ["r0"])
            gone = await c.queued("r1", 1)
            later = await c.queued("r2", 2)
            gone.cancel()           # what the app does when the client disconnects
            await _until(lambda: len(c.queue) == 1)
            fake.release["r0"].set()
            await holder
            await _until(lambda: fake.taken == ["r0", "r2"])
            fake.release["r2"].set()
            await later
            assert "r1" not in fake.taken and len(c.queue) == 0

    asyncio.run(main())


def test_no_registered_worker_is_503_at_once_without_queueing(tokenizer):
    async def main():
        metrics = FrontendMetrics(CollectorRegistry())
        queue = AdmissionQueue(8, 60.0, metrics)
        # Never started: it has seen no worker registered.
        client = WorkerClient(StaticDiscovery(StaticDiscoveryConfig(("http://x:1",))), poll_interval_s=60,
                              transport=httpx.MockTransport(lambda r: httpx.Response(500)))
        gen = Generation(client, RoutePlanner(RoundRobinPolicy(), KVIndex(16), metrics), tokenizer,
                         metrics, p.GenerateRequest("r", [5], p.SamplingParams(max_tokens=1)), [], time.monotonic(),
                         admission=queue)
        with pytest.raises(OpenAIError) as e:
            await gen.start()
        await client.close()
        assert e.value.status == 503 and e.value.message.endswith("no worker is registered in discovery")
        assert metrics.requests_rejected.labels(reason="no_worker")._value.get() == 1

    asyncio.run(main())


# --- prefill overflow: local prefill or wait -----------------------------------------------

def _worker(role: str, name: str, state: WorkerState = WorkerState.READY, pending: int = 0,
            rate: float = 0.0, blocks: tuple[int, int] = (0, 0)) -> WorkerStatus:
    w = WorkerStatus(f"http://{name}")
    w.set_ready(_info(role, name))
    w.record = WorkerRecord(worker_id=name, role=role, api_url=w.url, metrics_url="", model_name="tiny",
                            state="ready", num_pending_prefill_tokens=pending,
                            prefill_tokens_per_s=rate, kv_blocks_in_use=blocks[0],
                            kv_blocks_total=blocks[1], last_heartbeat=time.time())
    if state is not WorkerState.READY:
        w.set_down(state, f"{state.value} for the test")
    return w


def _planner(overflow: str = "local", max_wait: float = 10.0) -> RoutePlanner:
    return RoutePlanner(RoundRobinPolicy(), KVIndex(16), FrontendMetrics(CollectorRegistry()),
                        overflow, max_wait)


REQUEST = p.GenerateRequest("r", list(range(40)), p.SamplingParams(max_tokens=2))


def test_without_a_ready_prefill_worker_decode_workers_compute_the_prompt_themselves():
    planner = _planner()
    route = planner.route(REQUEST, [_worker("prefill", "p0", WorkerState.UNREACHABLE),
                                    _worker("decode", "d0"), _worker("decode", "d1")])
    assert [(a.url, a.prefill, a.local_prefill, a.compute_tokens) for a in route.attempts] == [
        ("http://d0", None, "no_prefill_worker", 40), ("http://d1", None, "no_prefill_worker", 40)]
    planner.sent("r", route.attempts[0])
    assert planner.local_prefills == {"no_prefill_worker": 1, "prefill_saturated": 0}
    # Policy queue names no worker, and says why.
    route = _planner("queue").route(REQUEST, [_worker("decode", "d0")])
    assert route.attempts == [] and route.reason == "no ready prefill worker, and no ready both worker"


def test_a_saturated_prefill_worker_is_passed_over_by_its_expected_wait():
    # 1000 tokens/s: p0 has 20 s of work queued, p1 5 s, p2 an unknown rate (not saturated).
    p0, p1 = _worker("prefill", "p0", pending=20_000, rate=1000.0), _worker("prefill", "p1", pending=5_000, rate=1000.0)
    d0 = _worker("decode", "d0")
    planner = _planner()
    assert {planner.route(REQUEST, [p0, p1, d0]).attempts[0].prefill.worker_id for _ in range(3)} == {"p1"}
    assert planner.route(REQUEST, [p0, _worker("prefill", "p2", pending=10**6), d0]).attempts[0].prefill.worker_id == "p2"
    route = planner.route(REQUEST, [p0, d0])
    assert [(a.prefill, a.local_prefill) for a in route.attempts] == [(None, "prefill_saturated")]
    route = _planner("queue").route(REQUEST, [p0, d0])
    assert route.attempts == [] and route.reason == (
        "every ready prefill worker expects a wait above 10s (p0: 20.0s)")
    # What this frontend has in flight counts before the worker reports it: 11,000 tokens
    # sent to p1 make its wait 11 s.
    planner.trying("big", _attempt_on("p1", 11_000), 40)
    assert planner.route(REQUEST, [p1, d0]).attempts[0].local_prefill == "prefill_saturated"
    planner.refused("big")
    assert planner.route(REQUEST, [p1, d0]).attempts[0].prefill.worker_id == "p1"
    # Without a wait limit (the default) a busy prefill worker is still used: its queue is
    # a queue, and the decode worker waits for it up to its busy timeout.
    default = RoutePlanner(RoundRobinPolicy(), KVIndex(16), FrontendMetrics(CollectorRegistry()))
    assert default.route(REQUEST, [p0, d0]).attempts[0].prefill.worker_id == "p0"


def test_a_load_read_before_our_work_there_ended_is_not_current_however_fresh_its_heartbeat():
    # p0 reported 20 s of queued prefill (saturated at a 10 s limit). The store's keep-alive
    # rewrites that record with a new last_heartbeat after our request there has finished:
    # the load was read before then, so p0 counts as idle (CI saw 8 of 8 all-distinct
    # prompts go to the other worker this way). A load read after it ended still counts.
    planner = _planner()
    d0 = _worker("decode", "d0")
    planner.trying("a", _attempt_on("p0", 100), 40)
    planner.finished("a")
    settled = time.time()
    for observed, saturated in ((settled - 5.0, False), (settled + 5.0, True)):
        p0 = _worker("prefill", "p0", pending=20_000, rate=1000.0)
        p0.record = msgspec.structs.replace(p0.record, last_heartbeat=settled + 5.0,
                                            load_observed_at=observed)
        (attempt,) = planner.route(REQUEST, [p0, d0]).attempts
        assert (attempt.local_prefill == "prefill_saturated") is saturated


def _attempt_on(prefill_worker: str, tokens: int) -> Attempt:
    return Attempt("http://d0", "d0", None, prefill_worker, tokens)


def test_queue_policy_waits_for_a_prefill_worker_then_sends_the_request_naming_it(tokenizer):
    fake = SlotWorkers({"d0": 4}, 1)

    async def main():
        async with Cluster(fake, tokenizer, overflow="queue") as c:
            (p0,) = [w for w in c.client.workers() if w.role == "prefill"]
            p0.set_down(WorkerState.UNREACHABLE, "paused for the test")
            task = await c.queued("r0", 1)
            assert fake.taken == []
            p0.set_ready(p0.info)
            c.queue.notify()            # what the worker client does when a worker turns ready
            await _until(lambda: fake.taken == ["r0"])
            assert fake.bodies[0]["prefill"]["worker_id"] == "p0"
            fake.release["r0"].set()
            await task

    asyncio.run(main())


def test_fits_predicts_room_from_reports_and_what_is_in_flight():
    planner = _planner()
    p0, d0 = _worker("prefill", "p0"), _worker("decode", "d0", blocks=(1, 5))
    assert planner.fits(REQUEST, [p0, d0])          # 3 blocks needed, 4 free
    planner.trying("other", _attempt_on("p0", 40), 40)
    assert not planner.fits(REQUEST, [p0, d0])      # 3 more in flight on d0
    planner.refused("other")
    assert planner.fits(REQUEST, [p0, d0])
    # A prompt no worker's pool can ever hold is refused outright rather than queued.
    big = p.GenerateRequest("r", list(range(100)), p.SamplingParams(max_tokens=1))
    small_pool = [p0, _worker("decode", "d0", blocks=(0, 5))]
    assert planner.oversized(big, planner.route(big, small_pool), small_pool) == (
        "the prompt needs 7 KV blocks of 16 tokens, but the largest KV cache of the workers "
        "that could serve it holds 5")
    assert planner.oversized(REQUEST, planner.route(REQUEST, small_pool), small_pool) is None
