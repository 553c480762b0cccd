"""The worker serves whatever engine implements its seam (worker/engine_api.WorkerEngine).

A second engine, with no model, stands behind the real worker app here: its
/health, /info, /generate, /stats and /kv_events answer from the seam's calls alone. This
is what lets a vLLM engine serve behind the same worker (issue 8)."""

from __future__ import annotations

from pathlib import Path

import httpx

from splitserve.engine.errors import CapacityError, RequestError
from splitserve.engine.types import EngineStats, FinishReason, RequestOutput, SamplingParams
from splitserve.kvtypes.block_hash import extend_block_hashes
from splitserve.kvtypes.events import AllCleared, BlockStored, decode_batch
from splitserve.worker import protocol as p
from splitserve.worker.app import create_app
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_api import EngineInfo, EngineState, WorkerEngine
from splitserve.worker.kv_events import KVEventPublisher
from test_worker_loading import ThreadServer, _wait

BLOCK_SIZE = 4


class CountingEngine(WorkerEngine):
    """Generates the integers after the prompt's last token; caches each prompt's full
    blocks under the chained hashes every router computes. It serves no KV transfers:
    it refuses reservations and held prefills, as any engine may."""

    def __init__(self, on_fatal, on_kv_events=None):
        super().__init__(on_fatal, on_kv_events)
        self.cached: list[int] = []
        self.added: list[str] = []

    def start(self) -> None:
        self.state = EngineState.READY

    def stop(self, timeout: float = 10.0) -> None:
        pass  # no thread, nothing to stop

    def info(self) -> EngineInfo | None:
        return EngineInfo("counting", Path("/nonexistent/counting"), 64, BLOCK_SIZE, (0,))

    def kv_memory(self):
        return None

    def stats(self) -> EngineStats:
        return EngineStats(kv_blocks_total=16, prefix_cache_queries_tokens=4 * len(self.added))

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.added.append(request_id)
        new = [h for h in extend_block_hashes([], prompt_token_ids, BLOCK_SIZE) if h not in self.cached]
        if new:
            self.cached += new
            self._on_kv_events([BlockStored(new)])
        return self._outputs(request_id, prompt_token_ids, params.max_tokens)

    async def _outputs(self, request_id: str, prompt: list[int], max_tokens: int):
        for i in range(max_tokens):
            last = i == max_tokens - 1
            yield RequestOutput(request_id, [prompt[-1] + 1 + i], finished=last,
                                finish_reason=FinishReason.LENGTH if last else None,
                                num_prompt_tokens=len(prompt))

    async def reserve(self, request_id, prompt_token_ids, params) -> list[int]:
        raise CapacityError("this engine serves no KV transfers")

    async def commit(self, request_id, num_computed_tokens, first_token, first_logprobs=None):
        raise RequestError(f"request {request_id!r} has no reservation", "request_id")

    def abort(self, request_id: str) -> None:
        pass  # every request finishes inside add(): nothing is ever left to abort

    def submit_held(self, request_id, prompt_token_ids, params, sink) -> None:
        sink.put(CapacityError("this engine serves no KV transfers"))

    def release_held(self, request_id: str) -> None:
        pass  # submit_held refuses every request: nothing is ever held

    async def kv_snapshot(self, take):
        return take([AllCleared(), *([BlockStored(list(self.cached))] if self.cached else [])])


def _first_batch(url: str):
    with httpx.stream("GET", f"{url}/kv_events", timeout=httpx.Timeout(10)) as resp:
        assert resp.status_code == 200
        return decode_batch(next(line for line in resp.iter_lines() if line))


def test_a_worker_serves_another_engine_through_the_seam_alone():
    publisher = KVEventPublisher("seam-0")
    fatal: list[str] = []
    engine = CountingEngine(fatal.append, on_kv_events=publisher.publish)
    worker = ThreadServer(create_app(engine, WorkerConfig(), "seam-0", publisher))
    try:
        _wait(lambda: httpx.get(f"{worker.url}/health").status_code == 200)
        info = httpx.get(f"{worker.url}/info").json()
        assert (info["model_name"], info["block_size"], info["max_model_len"], info["eos_token_ids"]) \
            == ("counting", BLOCK_SIZE, 64, [0])
        before = _first_batch(worker.url)
        assert (before.seq, before.events) == (0, [AllCleared()])

        prompt = list(range(5, 15))     # two full blocks of 4, and 2 tokens more
        body = p.encode(p.GenerateRequest("seam-1", prompt, p.SamplingParams(max_tokens=3, temperature=0)))
        r = httpx.post(f"{worker.url}/generate", content=body, timeout=30)
        chunks = [p.decode(line, p.GenerateChunk) for line in r.text.splitlines() if line]
        assert r.status_code == 200
        assert [t for c in chunks for t in c.new_token_ids] == [15, 16, 17]
        assert chunks[-1].finish_reason == "length" and engine.added == ["seam-1"]

        # The snapshot counts the one live batch the engine published, and names the
        # prompt's blocks as a router hashes them.
        after = _first_batch(worker.url)
        assert after.seq == 1
        assert after.events == [AllCleared(), BlockStored(extend_block_hashes([], prompt, BLOCK_SIZE))]
        assert httpx.get(f"{worker.url}/stats").json()["prefix_cache_queries_tokens"] == 4
        assert not fatal
    finally:
        worker.stop()
