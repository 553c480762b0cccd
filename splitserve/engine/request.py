"""A request inside the engine: two counters, `num_computed_tokens` catching up with
`num_tokens` (prompt + generated so far). Prefill, chunked prefill, decode and
recompute after preemption are all the same catch-up arithmetic."""

from __future__ import annotations

import enum

import torch

from splitserve.engine.sampler import position_generator
from splitserve.engine.types import FinishReason, SamplingParams


class RequestStatus(enum.Enum):
    RESERVED = "reserved"    # blocks held for KV another worker is sending; not scheduled
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...], arrival: int, hold: bool = False):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # NOTE: all_token_ids == prompt_token_ids + output_token_ids at all times.
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.arrival = arrival
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0      # prompt tokens served from the prefix cache (first schedule)
        self.num_transferred_tokens = 0  # prompt tokens whose KV arrived from another worker
        # A held request keeps its blocks after it finishes, until released: a peer is
        # still reading them (prefill role).
        self.hold = hold
        self.finish_reason: FinishReason | None = None
        # A structured request's matcher (engine/grammar.GrammarState), set at admission.
        self.grammar = None
        # Chained hashes of this request's full blocks, extended lazily; token ids of a full
        # block never change, so a computed hash stays valid for the request's lifetime.
        self.block_hashes: list[int] = []
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop.update(eos_token_ids)
        self.stop_token_ids = frozenset(stop)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def generator(self) -> torch.Generator | None:
        """For a seeded request, a fresh generator for the token sampled next (position
        num_tokens in prompt + output); None uses the engine's shared one. NOTE: by
        position, not by how many tokens this engine sampled: a decode worker resuming
        after a prefill worker (or a migrated request re-sent as prompt + output so far)
        draws exactly what one engine would have."""
        if self.params.seed is None:
            return None
        return position_generator(self.params.seed, self.num_tokens)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_finished(self, max_model_len: int) -> bool:
        """Sets finish_reason after a token was appended; True when the request is done."""
        last = self.output_token_ids[-1]
        if last in self.stop_token_ids:
            self.finish_reason = FinishReason.STOP
        elif self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = FinishReason.LENGTH
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
