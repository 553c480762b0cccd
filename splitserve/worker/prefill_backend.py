"""The prefill worker's side of a KV transfer: the engine as a transfer PrefillBackend.

The transfer server calls start() on one of its threads; the prefill itself runs in the
engine (WorkerEngine.submit_held) and reports each step's progress into a queue
this iterator drains. NOTE: a block is announced only once the engine says it is final
(kv_progress.num_ready_blocks), and it stays pinned until release(): the server reads
it from the KV tensor while the engine keeps computing other blocks.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator

from splitserve.engine.types import FinishReason, TokenLogprobs
from splitserve.transfer.backend import BlocksReady, Done, Event, PrefillBackend, PrefillRequest, Progress
from splitserve.transfer.protocol import FirstTokenLogprobs
from splitserve.worker.engine_api import HeldSink, WorkerEngine

logger = logging.getLogger(__name__)



class PrefillAborted(RuntimeError):
    """The engine ended the prefill without a first token (aborted or failed)."""


def logprobs_to_wire(lp: TokenLogprobs | None) -> FirstTokenLogprobs | None:
    return None if lp is None else FirstTokenLogprobs(lp.logprob, list(lp.top))


def logprobs_from_wire(token_id: int, lp: FirstTokenLogprobs | None) -> TokenLogprobs | None:
    return None if lp is None else TokenLogprobs(token_id, lp.logprob, tuple(lp.top))


class EnginePrefillBackend(PrefillBackend):
    def __init__(self, engine: WorkerEngine):
        self.engine = engine

    def start(self, request: PrefillRequest) -> Iterator[Event]:
        rid = request.request_id
        sink: HeldSink = queue.SimpleQueue()
        self.engine.submit_held(rid, list(request.token_ids), request.sampling.for_first_token(), sink)
        total = len(request.token_ids)
        sent = 0
        while True:
            item = sink.get()
            if isinstance(item, BaseException):
                raise item
            progress = item.kv_progress
            if progress.num_ready_blocks > sent:
                yield BlocksReady(sent, progress.block_ids[sent:progress.num_ready_blocks])
                sent = progress.num_ready_blocks
            yield Progress(progress.num_computed_tokens, total)
            if item.finished:
                if item.finish_reason is FinishReason.ABORT or not item.new_token_ids:
                    raise PrefillAborted(f"request_id={rid} prefill ended without a first token")
                logger.info("request_id=%s prefill done: %d tokens (%d cached), %d blocks",
                            rid, total, item.num_cached_tokens, sent)
                yield Done(item.new_token_ids[0], logprobs_to_wire((item.logprobs or [None])[0]))
                return

    def release(self, request_id: str) -> None:
        self.engine.release_held(request_id)
