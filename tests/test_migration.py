"""Mid-stream migration against faked workers: a decode worker that breaks its stream
after some tokens is replaced by another one, which receives prompt + the tokens so far
with max_tokens reduced; the client's text and counts are those of one stream, and every
move is counted. The limit turns the next loss into a clean 503."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from splitserve.discovery import StaticDiscovery, StaticDiscoveryConfig
from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.generation import Generation
from splitserve.frontend.routing import RoutePlanner
from splitserve.frontend.worker_client import WorkerClient
from splitserve.metrics import FrontendMetrics
from splitserve.router import KVIndex, RoundRobinPolicy
from splitserve.worker import protocol as p

PROMPT = [5, 6, 7]


class BreakingDecodeWorkers:
    """Prefill worker p0 and decode workers d0..d2. A decode worker answers with the next
    of `tokens` (the continuation it is asked for, one per chunk); the i-th request
    received breaks its connection after `breaks_after[i]` of them."""

    def __init__(self, tokens: list[int], breaks_after: list[int]):
        self.tokens, self.breaks_after = tokens, breaks_after
        self.roles = {"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"}
        self.received: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if path == "/health":
            return httpx.Response(200, content=p.encode(p.WorkerHealth("ok")))
        if path == "/info":
            kv = ("127.0.0.1", 7000) if self.roles[host] == "prefill" else (None, None)
            return httpx.Response(200, content=p.encode(p.WorkerInfo(
                role=self.roles[host], model_name="tiny", model_dir="/m", max_model_len=64,
                block_size=16, eos_token_ids=[2], worker_id=host, kv_host=kv[0], kv_port=kv[1])))
        body = json.loads(request.content)
        self.received.append((host, body))
        done = len(body["prompt_token_ids"]) - len(PROMPT)
        todo = self.tokens[done:done + body["sampling"]["max_tokens"]]
        limit = self.breaks_after[len(self.received) - 1]

        async def stream():
            for i, token in enumerate(todo):
                if i == limit:
                    raise httpx.RemoteProtocolError("peer closed connection without sending "
                                                    "complete message body")
                last = i == len(todo) - 1
                yield p.encode_line(p.GenerateChunk(
                    new_token_ids=[token], finish_reason="length" if last else None))
        return httpx.Response(200, content=stream())


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _run(tokenizer, fake, max_tokens: int, migration_limit: int = 3):
    metrics = FrontendMetrics(CollectorRegistry())

    async def main():
        urls = tuple(f"http://{h}:1" for h in fake.roles)
        client = WorkerClient(StaticDiscovery(StaticDiscoveryConfig(urls)), poll_interval_s=60,
                              transport=httpx.MockTransport(fake))
        await client.start()
        while len(client.workers()) < len(urls) or not all(w.ready for w in client.workers()):
            await asyncio.sleep(0.01)
        request = p.GenerateRequest("req-1", PROMPT, p.SamplingParams(max_tokens=max_tokens, temperature=0.0))
        gen = Generation(client, RoutePlanner(RoundRobinPolicy(), KVIndex(16), metrics), tokenizer,
                         metrics, request, [], time.monotonic(), migration_limit)
        try:
            await gen.start()
            deltas = [d async for d in gen.deltas()]
            return "".join(d.text for d in deltas), deltas[-1].finish_reason, gen
        except OpenAIError as e:
            return e, None, gen
        finally:
            await client.close()

    text, reason, gen = asyncio.run(main())
    return text, reason, gen, metrics.requests_migrated._value.get()


def test_a_stream_broken_mid_way_continues_on_another_decode_worker(tokenizer):
    tokens = tokenizer.encode(" one two three four five six", add_special_tokens=False)
    fake = BreakingDecodeWorkers(tokens, [2, 3, 100])
    text, reason, gen, migrated = _run(tokenizer, fake, max_tokens=len(tokens))
    assert (text, reason) == (tokenizer.decode(tokens), "length")
    assert (gen.num_prompt_tokens, gen.num_generated_tokens, gen.num_migrations, migrated) == (
        3, len(tokens), 2, 2)
    # Each new worker (never a lost one again) got the prompt plus everything generated so
    # far, under a fresh worker-side id that starts with the request's.
    assert len({host for host, _ in fake.received}) == 3
    assert [(body["request_id"], body["prompt_token_ids"], body["sampling"]["max_tokens"])
            for _, body in fake.received] == [
        ("req-1", PROMPT, len(tokens)),
        ("req-1-m1", PROMPT + tokens[:2], len(tokens) - 2),
        ("req-1-m2", PROMPT + tokens[:5], len(tokens) - 5)]
    assert {body["prefill"]["worker_id"] for _, body in fake.received} == {"p0"}


def test_past_the_migration_limit_the_client_gets_a_503(tokenizer):
    tokens = tokenizer.encode(" one two three four", add_special_tokens=False)
    fake = BreakingDecodeWorkers(tokens, [1, 1, 100])
    err, _, gen, migrated = _run(tokenizer, fake, max_tokens=len(tokens), migration_limit=1)
    assert isinstance(err, OpenAIError) and err.status == 503
    assert "already migrated 1 times (the limit)" in err.message
    assert (gen.num_generated_tokens, migrated, len(fake.received)) == (2, 1, 2)
