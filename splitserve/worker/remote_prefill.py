"""The decode worker's side of a disaggregated request: reserve, fetch, commit or fall back.

1. reserve the prompt's blocks (a decode worker that cannot hold the prompt refuses now,
   before any work starts: CapacityError -> 503 'capacity');
2. fetch the KV from the named prefill worker into exactly those blocks (transfer thread;
   resume, checksum re-send and stall detection live in splitserve.transfer);
3. commit: the engine adopts the blocks and the first token and decodes; or, when the
   transfer could not complete, apply the fallback policy — `local` continues the prompt
   here from the last verified block, `fail` frees everything and raises.

Never silent: every fallback is counted by reason (TransferStats) and logged at WARNING
with the request id. Fetches run on their own bounded thread pool (`kv_fetch_threads`;
more wait their turn in arrival order), never on the event loop's default executor, which
discovery's keep-alive needs. A caller that leaves cancels its fetch (P is told to drop
the request). NOTE: the reservation is released only after the fetch thread has
returned: until then the thread may still write into those blocks, and freeing them
early would let it scribble over another request's KV.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from splitserve.engine.types import RequestOutput, SamplingParams
from splitserve.transfer.backend import PrefillRequest
from splitserve.transfer.client import FetchCancel, fetch_kv
from splitserve.transfer.config import FetchResult, Outcome, TransferStats
from splitserve.worker.engine_api import EngineDeadError, WorkerEngine
from splitserve.worker.config import WorkerConfig
from splitserve.worker.prefill_backend import logprobs_from_wire
from splitserve.worker.prefill_peers import PrefillPeers
from splitserve.worker.protocol import PrefillTarget

logger = logging.getLogger(__name__)


class TransferFailed(RuntimeError):
    """The KV transfer failed and the fallback policy is 'fail'."""

    def __init__(self, request_id: str, result: FetchResult):
        super().__init__(
            f"KV transfer for request {request_id} failed ({result.outcome.value}): {result.reason}; "
            f"{result.blocks_verified} blocks had arrived verified; fallback policy is 'fail'")
        self.result = result


class RemotePrefill:
    def __init__(self, engine: WorkerEngine, config: WorkerConfig, stats: TransferStats,
                 observe_seconds, peers: PrefillPeers):
        self.engine = engine
        self.config = config
        self.stats = stats
        self.peers = peers
        self._observe_seconds = observe_seconds
        self._pool = ThreadPoolExecutor(config.kv_fetch_threads, thread_name_prefix="kv-fetch")
        self._fetches: dict[str, FetchCancel] = {}

    def close(self) -> None:
        """Cancel every fetch and let their threads return (each frees its reservation)."""
        for cancel in list(self._fetches.values()):
            cancel.cancel("the decode worker is shutting down")
        self._pool.shutdown(wait=False, cancel_futures=False)

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams,
                  target: PrefillTarget) -> AsyncIterator[RequestOutput]:
        """Returns the request's output stream once its KV is in place. Raises the
        engine's RequestError / CapacityError before any transfer, TransferFailed under
        --kv-fallback fail."""
        kv_address = await self.peers.resolve(request_id, target)
        block_ids = await self.engine.reserve(request_id, prompt, params)
        kv = self.engine.kv_memory()
        prefill = PrefillRequest(request_id, list(prompt), params, len(block_ids))
        logger.info("request_id=%s reserved %d KV blocks; fetching from prefill worker %s at %s:%d",
                    request_id, len(block_ids), target.worker_id, *kv_address)
        loop = asyncio.get_running_loop()
        cancel = self._fetches[request_id] = FetchCancel()
        try:
            fetch = loop.run_in_executor(
                self._pool, fetch_kv, kv_address, prefill, block_ids, kv.tensor,
                self.config.transfer, kv.fingerprint, self.stats, cancel)
        except RuntimeError:   # the pool is shut down: the worker is stopping
            del self._fetches[request_id]
            self.engine.abort(request_id)
            raise
        fetch.add_done_callback(lambda _f: self._fetches.pop(request_id, None))
        try:
            result: FetchResult = await asyncio.shield(fetch)
        except asyncio.CancelledError:
            cancel.cancel("the request was aborted (its caller left)")
            fetch.add_done_callback(lambda _f: self.engine.abort(request_id))
            logger.info("request_id=%s caller left during the KV transfer; fetch cancelled, the "
                        "reservation is released when the transfer thread returns", request_id)
            raise
        except BaseException:
            self.engine.abort(request_id)
            raise
        self._observe_seconds(result.seconds)
        self.stats.fetch_incidents(request_id, target.worker_id, result, self.config.kv_fallback)
        if result.outcome is Outcome.CANCELLED:    # only close() cancels a live caller's fetch
            self.engine.abort(request_id)
            raise EngineDeadError(f"KV fetch cancelled: {result.reason}")
        if result.ok:
            return await self.engine.commit(
                request_id, len(prompt), result.first_token,
                logprobs_from_wire(result.first_token, result.first_logprobs))
        return await self._fallback(request_id, prompt, result)

    async def _fallback(self, request_id: str, prompt: list[int], result: FetchResult):
        bs = self.engine.kv_memory().block_size
        reuse = min(result.blocks_verified * bs, len(prompt))
        if self.config.kv_fallback == "fail":
            logger.warning("request_id=%s KV transfer failed (%s: %s); fallback policy 'fail': "
                           "request refused, %d reserved blocks freed", request_id,
                           result.outcome.value, result.reason, -(-len(prompt) // bs))
            self.engine.abort(request_id)
            raise TransferFailed(request_id, result)
        logger.warning("request_id=%s KV transfer failed (%s: %s); fallback 'local': reusing %d "
                       "verified blocks (%d tokens), computing the remaining %d of %d prompt "
                       "tokens here", request_id, result.outcome.value, result.reason,
                       result.blocks_verified, reuse, len(prompt) - reuse, len(prompt))
        return await self.engine.commit(request_id, reuse, None)
