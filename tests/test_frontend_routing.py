"""The frontend's side of disaggregation without any worker process: the route planner
(round-robin policy) and the health rule over fake worker records, and the retry / error
mapping of a request against workers faked with httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.generation import Generation
from splitserve.discovery import StaticDiscovery, StaticDiscoveryConfig, WorkerRecord
from splitserve.frontend.routing import RoutePlanner, unavailable_reason
from splitserve.frontend.worker_client import WorkerClient
from splitserve.frontend.workers import WorkerState, WorkerStatus
from splitserve.metrics import FrontendMetrics
from splitserve.router import KVIndex, RoundRobinPolicy
from splitserve.worker import protocol as p


def _info(role: str, name: str, kv: bool = True) -> p.WorkerInfo:
    kv_host, kv_port = ("127.0.0.1", 7000 + len(name)) if role == "prefill" and kv else (None, None)
    return p.WorkerInfo(role=role, model_name="tiny", model_dir="/m", max_model_len=64,
                        block_size=16, eos_token_ids=[2], worker_id=name, kv_host=kv_host,
                        kv_port=kv_port)


def _worker(role: str, name: str, state: WorkerState = WorkerState.READY, kv: bool = True) -> WorkerStatus:
    w = WorkerStatus(f"http://{name}")
    w.set_ready(_info(role, name, kv))
    if state is not WorkerState.READY:
        w.set_down(state, f"{state.value} for the test")
    return w


def _request() -> p.GenerateRequest:
    return p.GenerateRequest("cmpl-test", [5, 6, 7], p.SamplingParams(max_tokens=2, temperature=0.0))


def _route(planner, workers):
    return planner.route(_request(), workers).attempts


def _planner() -> RoutePlanner:
    return RoutePlanner(RoundRobinPolicy(), KVIndex(16), FrontendMetrics(CollectorRegistry()))


def _static(urls: list[str]) -> StaticDiscovery:
    return StaticDiscovery(StaticDiscoveryConfig(tuple(urls)))


def test_round_robin_alternates_decode_and_prefill_and_lists_every_decode_worker():
    workers = [_worker("prefill", "p0"), _worker("prefill", "p1"), _worker("decode", "d0"),
               _worker("decode", "d1"), _worker("decode", "d2"), _worker("both", "b0")]
    planner = _planner()
    routes = [_route(planner, workers) for _ in range(3)]
    # D in turn, and the other D by id as the fallbacks, each once.
    assert [[a.url for a in r] for r in routes] == [
        ["http://d0", "http://d1", "http://d2"], ["http://d1", "http://d0", "http://d2"],
        ["http://d2", "http://d0", "http://d1"]]
    # P in turn, the same P for every attempt of one request.
    assert [{a.prefill.worker_id for a in r} for r in routes] == [{"p0"}, {"p1"}, {"p0"}]
    assert routes[0][0].prefill == p.PrefillTarget("p0", "127.0.0.1", 7002)


def test_without_a_usable_pair_requests_go_to_both_workers():
    planner = _planner()
    decode_down = [_worker("prefill", "p0"), _worker("decode", "d0", WorkerState.UNREACHABLE),
                   _worker("both", "b0"), _worker("both", "b1")]

    def targets(route):
        return [(a.url, a.prefill) for a in route]

    assert targets(_route(planner, decode_down)) == [("http://b0", None), ("http://b1", None)]
    assert targets(_route(planner, decode_down)) == [("http://b1", None), ("http://b0", None)]
    # A prefill worker without a KV address cannot be fetched from.
    no_kv = [_worker("prefill", "p0", kv=False), _worker("decode", "d0"), _worker("both", "b0")]
    assert targets(_route(planner, no_kv)) == [("http://b0", None)]
    assert _route(planner, [_worker("prefill", "p0"), _worker("both", "b0", WorkerState.LOADING)]) == []


def test_health_needs_a_ready_pair_or_a_ready_both_worker_or_with_local_prefill_a_decode_worker():
    assert unavailable_reason([_worker("prefill", "p0"), _worker("decode", "d0")]) is None
    assert unavailable_reason([_worker("both", "b0"), _worker("decode", "d0", WorkerState.FAILED)]) is None
    # Policy local (the default): a decode worker alone serves, computing prompts itself.
    assert unavailable_reason([_worker("decode", "d0")]) is None
    assert unavailable_reason([_worker("prefill", "p0", WorkerState.LOADING), _worker("decode", "d0")]) is None
    assert unavailable_reason([_worker("decode", "d0")], local_prefill=False) == (
        "no ready prefill worker, and no ready both worker")

    reason = unavailable_reason([_worker("prefill", "p0"), _worker("decode", "d0", WorkerState.UNREACHABLE)])
    assert reason == ("no ready decode worker, and no ready both worker "
                      "(worker http://d0 (decode): unreachable: unreachable for the test)")
    reason = unavailable_reason([_worker("prefill", "p0", kv=False), _worker("decode", "d0")],
                                local_prefill=False)
    assert reason.startswith("no ready prefill worker with a KV address (http://p0 advertise none)")
    reason = unavailable_reason([_worker("prefill", "p0", WorkerState.LOADING), WorkerStatus("http://x")])
    assert reason == ("no worker is ready (worker http://p0 (prefill): loading: loading for the test; "
                      "worker http://x: unreachable: not contacted yet)")


def test_cluster_entry_names_role_addresses_state_and_last_healthy():
    before = time.time()
    p0 = _worker("prefill", "p0")
    assert p0.to_json() == {
        "id": "p0", "role": "prefill", "api_url": "http://p0", "metrics_url": "http://p0/metrics",
        "kv_address": "127.0.0.1:7002", "state": "ready", "reason": None,
        "last_healthy": p0.last_healthy, "load": None, "kv_usage": None, "last_heartbeat": None,
        "restarts": None}
    assert p0.last_healthy >= before
    # With a discovery record: its load, KV usage, heartbeat and restarts; 'failed' is not
    # routable.
    p0.record = WorkerRecord(worker_id="p0", role="prefill", api_url="http://p0",
                             metrics_url="http://p0:9/metrics", model_name="tiny", state="failed",
                             num_requests_running=2, num_requests_waiting=1,
                             num_pending_prefill_tokens=300, prefill_tokens_per_s=150.0, kv_blocks_in_use=25,
                             kv_blocks_total=100, last_heartbeat=1234.5, restarts=2)
    entry = p0.to_json()
    assert {k: entry[k] for k in ("metrics_url", "state", "reason", "load", "kv_usage",
                                  "last_heartbeat", "restarts")} == {
        "metrics_url": "http://p0:9/metrics", "state": "failed",
        "reason": "its discovery record says failed",
        "load": {"running": 2, "waiting": 1, "pending_prefill_tokens": 300, "prefill_tokens_per_s": 150.0},
        "kv_usage": {"blocks_in_use": 25, "blocks_total": 100, "fraction": 0.25},
        "last_heartbeat": 1234.5, "restarts": 2}
    assert not p0.ready and p0.load().num_requests == 3
    d0 = _worker("decode", "d0", WorkerState.UNREACHABLE)
    entry = d0.to_json()
    assert (entry["kv_address"], entry["state"]) == (None, "unreachable")
    assert entry["reason"] == "unreachable for the test"
    assert WorkerStatus("http://new").to_json()["role"] is None


# --- one request against faked workers ---------------------------------------------------

def _ndjson(*chunks: p.GenerateChunk) -> bytes:
    return b"".join(p.encode_line(c) for c in chunks)


class FakeWorkers:
    """Healthy workers of the given roles whose /generate answers with a canned reply per
    worker host; records which worker received what."""

    def __init__(self, roles: dict[str, str], replies: dict[str, httpx.Response | Exception]):
        self.roles, self.replies = roles, replies
        self.received: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/health":
            return httpx.Response(200, content=p.encode(p.WorkerHealth("ok")))
        if request.url.path == "/info":
            return httpx.Response(200, content=p.encode(_info(self.roles[host], host)))
        self.received.append((host, json.loads(request.content)))
        if isinstance(reply := self.replies[host], Exception):
            raise reply
        return reply


def _answer(tokenizer, text: str) -> httpx.Response:
    """A decode worker's stream of `text`, one token per chunk, after a full KV transfer."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    *first, last = [p.GenerateChunk(new_token_ids=[i]) for i in ids]
    last.finish_reason, last.num_prompt_tokens, last.num_transferred_tokens = "length", 3, 3
    return httpx.Response(200, content=_ndjson(*first, last))
FULL = httpx.Response(503, content=p.encode(p.WorkerError("no room for 3 tokens", code="capacity")))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _run(tokenizer, replies):
    """One request to prefill worker p0 and decode workers named by `replies`, answered by
    those replies. Returns (fake, the text or the OpenAIError, the worker records after)."""
    fake = FakeWorkers({"p0": "prefill", **{d: "decode" for d in replies}}, replies)

    async def main():
        # One poll round (the next one is a minute away) makes every worker ready.
        client = WorkerClient(_static([f"http://{h}:1" for h in fake.roles]), poll_interval_s=60,
                              transport=httpx.MockTransport(fake))
        await client.start()
        while len(client.workers()) < len(fake.roles) or not all(w.ready for w in client.workers()):
            await asyncio.sleep(0.01)
        gen = Generation(client, _planner(), tokenizer, FrontendMetrics(CollectorRegistry()),
                         _request(), [], time.monotonic())
        try:
            await gen.start()
            return "".join([d.text async for d in gen.deltas()])
        except OpenAIError as e:
            return e
        finally:
            await client.close()

    return fake, asyncio.run(main())


def test_a_full_decode_worker_hands_the_request_to_the_next_naming_the_same_prefill(tokenizer):
    fake, text = _run(tokenizer, {"d0": FULL, "d1": _answer(tokenizer, "Hi")})
    assert text == "Hi"
    assert [host for host, _ in fake.received] == ["d0", "d1"]
    assert all(body["prefill"] == {"worker_id": "p0", "kv_host": "127.0.0.1", "kv_port": 7002}
               for _, body in fake.received)


def test_an_unreachable_decode_worker_is_skipped(tokenizer):
    fake, text = _run(tokenizer, {"d0": httpx.ConnectError("refused"), "d1": _answer(tokenizer, "Hi")})
    assert text == "Hi" and [host for host, _ in fake.received] == ["d0", "d1"]


def test_when_every_decode_worker_is_full_the_client_gets_503_with_the_reasons(tokenizer):
    fake, err = _run(tokenizer, {"d0": FULL, "d1": FULL})
    assert isinstance(err, OpenAIError) and err.status == 503
    assert err.message == ("no worker could take the request: worker http://d0:1 is full: no room "
                           "for 3 tokens; worker http://d1:1 is full: no room for 3 tokens")
    assert err.body()["error"]["type"] == "ServiceUnavailableError"


def test_a_failed_kv_transfer_is_a_502_with_the_workers_reason_and_no_retry(tokenizer):
    failed = httpx.Response(502, content=p.encode(p.WorkerError(
        "prefill worker p0 stalled for 30s (fallback policy: fail)", code="kv_transfer")))
    fake, err = _run(tokenizer, {"d0": failed, "d1": _answer(tokenizer, "Hi")})
    assert [host for host, _ in fake.received] == ["d0"]
    assert err.status == 502 and err.body()["error"] == {
        "message": "the prompt's KV cache could not be transferred: prefill worker p0 stalled "
                   "for 30s (fallback policy: fail)",
        "type": "BadGatewayError", "param": None, "code": 502}


def test_an_invalid_request_is_a_400_without_retry(tokenizer):
    refused = httpx.Response(400, content=p.encode(p.WorkerError("top_k must be >= 0", "top_k")))
    fake, err = _run(tokenizer, {"d0": refused, "d1": _answer(tokenizer, "Hi")})
    assert (err.status, err.param, len(fake.received)) == (400, "top_k", 1)


def test_polling_learns_roles_and_states(tokenizer):
    infos = {"p0": _info("prefill", "p0"), "d0": _info("decode", "d0")}

    def handler(request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if host == "gone":
            raise httpx.ConnectError("connection refused")
        if host == "slow":
            return httpx.Response(503, content=p.encode(p.WorkerHealth("loading", "the model is loading")))
        return httpx.Response(200, content=p.encode(infos[host] if path == "/info" else p.WorkerHealth("ok")))

    async def main():
        client = WorkerClient(_static(["http://p0:1", "http://d0:1", "http://slow:1", "http://gone:1"]),
                              poll_interval_s=0.01, transport=httpx.MockTransport(handler))
        await client.start()
        await asyncio.wait_for(client.first_ready.wait(), 5)
        while any(w.reason == "not contacted yet" for w in client.workers()):
            await asyncio.sleep(0.01)
        await client.close()
        return {w.url: (w.role, w.state, w.reason) for w in client.workers()}

    assert asyncio.run(main()) == {
        "http://p0:1": ("prefill", WorkerState.READY, None),
        "http://d0:1": ("decode", WorkerState.READY, None),
        "http://slow:1": (None, WorkerState.LOADING, "the model is loading"),
        "http://gone:1": (None, WorkerState.UNREACHABLE, "unreachable: ConnectError('connection refused')")}
