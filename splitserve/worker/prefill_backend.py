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

from splitserve.engine.types import FinishReason, SamplingParams, TokenLogprobs
from splitserve.transfer.backend import BlocksReady, Done, Event, PrefillBackend, PrefillRequest, Progress
from splitserve.transfer.protocol import FirstTokenLogprobs, FirstTokenSampling
from splitserve.worker.engine_api import HeldSink, WorkerEngine

logger = logging.getLogger(__name__)



class PrefillAborted(RuntimeError):
    """The engine ended the prefill without a first token (aborted or failed)."""


def first_token_params(sampling: FirstTokenSampling) -> SamplingParams:
    """The first token is sampled on P, so P needs the controls that shape it. Raises
    SamplingError for values the engine refuses (e.g. a stop token outside the
    vocabulary), which fails this request only."""
    return SamplingParams(max_tokens=1, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, seed=sampling.seed,
                          stop_token_ids=tuple(sampling.stop_token_ids),
                          ignore_eos=sampling.ignore_eos, logprobs=sampling.logprobs,
                          presence_penalty=sampling.presence_penalty,
                          frequency_penalty=sampling.frequency_penalty,
                          repetition_penalty=sampling.repetition_penalty,
                          logit_bias=tuple(tuple(e) for e in sampling.logit_bias),
                          min_tokens=sampling.min_tokens,
                          resumed_output_tokens=sampling.resumed_output_tokens)


def sampling_for_prefill(params: SamplingParams) -> FirstTokenSampling:
    """What a decode worker sends a prefill worker about sampling (PrefillRequest.sampling)."""
    return FirstTokenSampling(temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k, seed=params.seed,
                              stop_token_ids=list(params.stop_token_ids),
                              ignore_eos=params.ignore_eos, logprobs=params.logprobs,
                              presence_penalty=params.presence_penalty,
                              frequency_penalty=params.frequency_penalty,
                              repetition_penalty=params.repetition_penalty,
                              logit_bias=[tuple(e) for e in params.logit_bias],
                              min_tokens=min(params.min_tokens, 1),
                              resumed_output_tokens=params.resumed_output_tokens)


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
        self.engine.submit_held(rid, list(request.token_ids), first_token_params(request.sampling), sink)
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
