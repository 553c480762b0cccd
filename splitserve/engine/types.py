"""Typed values that cross the engine's boundary (worker <-> engine)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SamplingError(ValueError):
    """A sampling parameter is invalid; the message names the parameter."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy; top_k <= 0 disables top-k."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise SamplingError(f"temperature must be non-negative, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise SamplingError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}", "top_k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS or a stop token id
    LENGTH = "length"      # max_tokens or max_model_len reached
    ABORT = "abort"        # aborted by the caller


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
    extra: dict = field(default_factory=dict)
