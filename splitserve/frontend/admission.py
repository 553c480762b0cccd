"""The frontend's admission queue: backpressure instead of 503.

A request no worker can take right now (every decode worker full, none ready yet, or, by
policy, no prefill worker usable) waits here, in arrival order, and tries again when
capacity may have changed: one of this frontend's requests finished or got its first
token, a worker's record or state changed (notify()), or at a short periodic tick that
covers work of other frontends. It waits at most `timeout_s` (then 503 with the last
refusal) in a queue of at most `max_queued` (one more: 429).

Order (FIFO, as vLLM's first-come-first-served waiting queue): only the oldest waiter
(the head) tries, so a later request never takes capacity an earlier one was waiting
for. A request that arrives while others wait queues behind them without trying. An
attempt leaves the queue while it is in flight (a decode worker answers only once the
prompt's KV is in place, which can take minutes); if it is refused it returns to its
original place. To keep one freed slot from waking the whole queue, each change grants
the head one try; the next head tries in the same change only if the caller predicts it
fits (`fits`, from the frontend's own account of what it sent where).

A waiter whose client disconnects is cancelled and leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from splitserve.frontend.errors import OpenAIError, unavailable
from splitserve.metrics import FrontendMetrics

logger = logging.getLogger(__name__)

# How often the head retries without any signal: capacity freed by other frontends'
# requests (or by workers whose records say nothing, a static list) is noticed this fast.
RETRY_TICK_S = 0.5


@dataclass(order=True)
class _Waiter:
    seq: int
    request_id: str = field(compare=False)
    since: float = field(compare=False)
    refusal: str = field(compare=False)
    refused_at: int = field(default=-1, compare=False)     # epoch at the start of its last try


class AdmissionQueue:
    def __init__(self, max_queued: int, timeout_s: float, metrics: FrontendMetrics,
                 tick_s: float = RETRY_TICK_S):
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._tick_s = tick_s
        self._seq = itertools.count()
        self._waiting: list[_Waiter] = []           # sorted by arrival (seq)
        self._queued: dict[int, _Waiter] = {}       # every request that queued and is not done
        self._epoch = 0         # bumped by every change that may have freed capacity
        self._spent = -1        # the epoch whose one unconditional try the head has used
        self._wakeup = asyncio.Event()

    def __len__(self) -> int:
        """Requests that queued and are not admitted yet (waiting, or retrying)."""
        return len(self._queued)

    def snapshot(self) -> dict:
        """The queue for GET /cluster."""
        oldest = min((w.since for w in self._queued.values()), default=None)
        return {"length": len(self._queued), "max_length": self.max_queued,
                "oldest_wait_s": None if oldest is None else round(time.monotonic() - oldest, 3),
                "timeout_s": self.timeout_s}

    def notify(self) -> None:
        """Capacity may have changed: the head tries again."""
        self._epoch += 1
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def admit(self, request_id: str, attempt: Callable[[], Awaitable[str | None]],
                    fits: Callable[[], bool]) -> None:
        """Run `attempt` (None: a worker took the request; else why none could now) in the
        request's turn until it succeeds. Raises OpenAIError 429 (queue full) or 503 (the
        wait limit passed); whatever `attempt` raises passes through."""
        waiter = _Waiter(next(self._seq), request_id, time.monotonic(), "")
        if not self._waiting:
            waiter.refused_at = self._epoch
            refusal = await attempt()
            if refusal is None:
                return
        else:
            refusal = f"waiting behind {len(self._waiting)} earlier request(s)"
        if len(self._waiting) >= self.max_queued:
            self._metrics.requests_rejected.labels(reason="queue_full").inc()
            logger.warning("request_id=%s refused: the queue is full (%d waiting): %s", request_id,
                           len(self._waiting), refusal)
            raise OpenAIError(429, f"the server is at capacity and its queue is full "
                                   f"({self.max_queued} requests waiting): {refusal}")
        waiter.refusal = refusal
        logger.info("request_id=%s queued (%d ahead): %s", request_id, len(self._waiting), refusal)
        self._enter(waiter)
        try:
            await self._wait_and_retry(waiter, attempt, fits)
        finally:
            self._leave(waiter)

    async def _wait_and_retry(self, waiter: _Waiter, attempt, fits) -> None:
        deadline = waiter.since + self.timeout_s
        while True:
            if self._may_try(waiter, fits):
                self._waiting.remove(waiter)
                self._spent = waiter.refused_at = self._epoch
                self._wake()        # the next head may try too if it fits
                refusal = await attempt()
                if refusal is None:
                    logger.info("request_id=%s admitted after %.3fs in the queue", waiter.request_id,
                                time.monotonic() - waiter.since)
                    return
                waiter.refusal = refusal
                bisect.insort(self._waiting, waiter)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._metrics.requests_rejected.labels(reason="queue_timeout").inc()
                logger.warning("request_id=%s: no worker took it within %gs: %s", waiter.request_id,
                               self.timeout_s, waiter.refusal)
                raise unavailable(f"no worker could take the request within {self.timeout_s:g}s "
                                  f"(the queue's wait limit): {waiter.refusal}")
            head = self._waiting[0] is waiter
            try:
                await asyncio.wait_for(self._wakeup.wait(),
                                       min(remaining, self._tick_s) if head else remaining)
            except TimeoutError:
                if head and deadline > time.monotonic():
                    self.notify()       # the periodic tick

    def _may_try(self, waiter: _Waiter, fits: Callable[[], bool]) -> bool:
        if self._waiting[0] is not waiter or waiter.refused_at >= self._epoch:
            return False        # not its turn, or refused since the last change
        return self._epoch > self._spent or fits()

    def _enter(self, waiter: _Waiter) -> None:
        bisect.insort(self._waiting, waiter)
        self._queued[waiter.seq] = waiter
        self._metrics.requests_queued.set(len(self._queued))

    def _leave(self, waiter: _Waiter) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        del self._queued[waiter.seq]
        self._metrics.requests_queued.set(len(self._queued))
        self._metrics.request_queue_wait.observe(time.monotonic() - waiter.since)
        self._wake()        # the head may have changed
