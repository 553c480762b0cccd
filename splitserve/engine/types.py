"""Typed values that cross the engine's boundary (worker <-> engine)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from splitserve.sampling_params import (  # noqa: F401  (the engine's names for them)
    MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE, MAX_TOKEN_ID,
    SAMPLING_EPS, SEED_MAX, SEED_MIN, SamplingError, SamplingParams)

@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability and the `top` most likely tokens' (id,
    logprob), most likely first. As vLLM's default (logprobs_mode raw_logprobs): the
    log-softmax of the model's logits before temperature, top-k or top-p."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS or a stop token id
    LENGTH = "length"      # max_tokens or max_model_len reached
    ABORT = "abort"        # aborted by the caller
    ERROR = "error"        # the engine failed this request alone (RequestOutput.error says why)


@dataclass
class KVProgress:
    """For a request whose KV another worker will read (a held prefill): how far its
    prompt's KV is final, and where it lives. Blocks [0, num_ready_blocks) of block_ids
    will not be written again while the request is held."""

    num_computed_tokens: int
    num_ready_blocks: int
    block_ids: list[int]


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0          # prompt tokens reused from this engine's prefix cache
    num_transferred_tokens: int = 0     # prompt tokens whose KV another worker computed
    kv_progress: KVProgress | None = None
    error: str | None = None            # set with FinishReason.ERROR
    # One per new token, for a request with SamplingParams.logprobs set; else None.
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineStats:
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_pending_prefill_tokens: int = 0     # prompt tokens admitted, not yet computed
    kv_blocks_in_use: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries_tokens: int = 0
    prefix_cache_hits_tokens: int = 0
    num_preemptions: int = 0
    num_reserved_requests: int = 0
    num_held_requests: int = 0
    # Prompt tokens this engine computed (cumulative; not cached, not transferred): a
    # prefill worker's throughput, from which routers estimate its queue's wait.
    num_computed_prompt_tokens: int = 0
