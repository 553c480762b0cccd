"""Continuous batching under a token budget, vLLM-v1 style.

Each step every scheduled request gets `num_new_tokens` = how far its computed counter
may advance this step. Running requests go first (decodes and unfinished chunked
prefills); waiting requests are admitted while budget, seats and blocks allow. When a
running request cannot get a block, the most recently admitted running request is
preempted (its blocks freed, its tokens recomputed later — cheaply, through the prefix
cache where its blocks survive). Requests a peer reads KV from (`hold`) are never
preempted: freeing their blocks mid-read would hand the peer someone else's bytes.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int          # tokens computed this step, from request.num_computed_tokens
    block_table: list[int]

    @property
    def samples(self) -> bool:
        """True when this step completes the request's known tokens, so its last logits
        produce the next token (end of prefill, or a decode step)."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    """The only currency between scheduler and model runner."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = self._victim(i)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new, self.kv.block_table(req.request_id)))
                budget -= num_new
                i += 1
        # Admitting new work while we just preempted would only thrash.
        while self.waiting and budget > 0 and not out.preempted \
                and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # A request committed after a KV transfer arrives with blocks and a computed
            # prefix of its own; everything else starts from the prefix cache.
            prefilled = bool(self.kv.block_table(req.request_id))
            cached = [] if prefilled else self.kv.find_cached_prefix(req)
            start = req.num_computed_tokens if prefilled else len(cached) * self.kv.block_size
            num_new = min(req.num_tokens - start, budget)
            # A held request (a peer reads its KV) gets its whole prompt's blocks up front:
            # it then never needs a block mid-prefill and is never a preemption victim.
            num_alloc = req.num_tokens - start if req.hold else num_new
            if not self.kv.allocate(req, num_alloc, cached):
                break
            self.waiting.popleft()
            if not prefilled:
                self.kv.record_prefix_lookup(req.num_tokens, start)
                if req.num_output_tokens == 0:
                    req.num_cached_tokens = start
                req.num_computed_tokens = start
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, self.kv.block_table(req.request_id)))
            budget -= num_new
        return out

    def _victim(self, first: int) -> Request:
        """The most recently admitted running request, not yet scheduled this step (index
        >= first), that no peer is reading from. NOTE: held requests hold every block they
        need, so running[first] (the one asking) is not held and always qualifies."""
        for req in reversed(self.running[first:]):
            if not req.hold:
                return req
        raise AssertionError("a held request asked for a block")

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        logger.info("request_id=%s preempted (recompute %d tokens later)", req.request_id, req.num_tokens)

    def finish(self, req: Request, free_blocks: bool = True) -> None:
        """Remove a request from whichever queue holds it; release its blocks unless a
        peer still reads them (the caller frees them later with kv.free)."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        if free_blocks:
            self.kv.free(req)
