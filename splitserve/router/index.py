"""Which worker holds which prefix blocks, from the workers' KV cache events.

A router asks: for this prompt, how many of its leading blocks does each worker already
have cached? Because block hashes are chained, "worker holds hash h_i" means it holds the
whole prefix up to block i, so the answer is the length of the run of the prompt's
hashes that the worker holds, counted from the first block.

Events reach the router only after a prefill has stored its blocks, so requests routed in
the meantime would see no overlap and scatter a shared prefix across workers. The index
therefore also keeps *predictions*: blocks a worker is about to hold because a request
was just routed to it. A prediction counts like a stored block until it expires (the
request failed, or its events were lost) or the worker reports the block removed.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Literal

from splitserve.kvtypes.block_hash import extend_block_hashes
from splitserve.kvtypes.events import AllCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch

logger = logging.getLogger(__name__)

ApplyResult = Literal["applied", "duplicate", "resync"]


class KVIndex:
    def __init__(self, block_size: int, prediction_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if prediction_ttl_s < 0:
            raise ValueError(f"prediction_ttl_s must be non-negative, got {prediction_ttl_s}")
        self.block_size = block_size
        self.prediction_ttl_s = prediction_ttl_s
        self._clock = clock
        self._stored: dict[str, set[int]] = {}
        self._predicted: dict[str, dict[int, float]] = {}   # worker -> hash -> expiry
        self._position: dict[str, tuple[int, int]] = {}     # worker -> (epoch, last seq)

    def block_hashes(self, token_ids: list[int]) -> list[int]:
        """The chained hashes of the full blocks of token_ids, as the engine computes them."""
        return extend_block_hashes([], token_ids, self.block_size)

    def apply(self, batch: KVEventBatch) -> ApplyResult:
        """Apply a worker's batch. 'duplicate': already applied, ignored. 'resync': a new
        epoch or a gap in seq; the worker's old entries were dropped before applying,
        because whatever was missed would otherwise stay wrong until evicted."""
        worker_id = batch.worker_id
        position = self._position.get(worker_id)
        result: ApplyResult = "applied"
        if position is not None and position[0] == batch.epoch:
            if batch.seq <= position[1]:
                return "duplicate"
            if batch.seq != position[1] + 1:
                logger.warning("KV events from worker %s skipped from seq %d to %d; "
                               "rebuilding its index entries", worker_id, position[1], batch.seq)
                result = "resync"
        elif position is not None or batch.seq != 0:
            # A restart (its cache is new) or a router that joined late.
            result = "resync"
        if result == "resync":
            self._forget_blocks(worker_id)
        self._position[worker_id] = (batch.epoch, batch.seq)
        for event in batch.events:
            self._apply_event(worker_id, event)
        return result

    def predict(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """`worker_id` was just given a prompt with these blocks: count them as held until
        its events confirm them or prediction_ttl_s passes."""
        now = self._clock()
        predicted = self._predicted.setdefault(worker_id, {})
        # Drop expired predictions here, the one place that adds them, so the map stays
        # bounded by what was routed within one TTL.
        for h in [h for h, expiry in predicted.items() if expiry <= now]:
            del predicted[h]
        expiry = now + self.prediction_ttl_s
        stored = self._stored.get(worker_id, set())
        for h in block_hashes:
            if h not in stored:
                predicted[h] = expiry

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker entirely (it left discovery)."""
        self._forget_blocks(worker_id)
        self._position.pop(worker_id, None)

    def overlap(self, worker_ids: Iterable[str], block_hashes: list[int]) -> dict[str, int]:
        """For each worker, how many leading blocks of the prompt it holds (or is predicted
        to hold). Workers the index never heard of hold nothing."""
        now = self._clock()
        return {w: self._leading_blocks(w, block_hashes, now) for w in worker_ids}

    def num_blocks(self, worker_id: str) -> int:
        """Blocks the worker reported as cached (predictions not included)."""
        return len(self._stored.get(worker_id, ()))

    # --- internals ------------------------------------------------------------------

    def _leading_blocks(self, worker_id: str, block_hashes: list[int], now: float) -> int:
        stored = self._stored.get(worker_id, set())
        predicted = self._predicted.get(worker_id, {})
        count = 0
        for h in block_hashes:
            if h not in stored and predicted.get(h, 0.0) <= now:
                break
            count += 1
        return count

    def _apply_event(self, worker_id: str, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            self._stored.setdefault(worker_id, set()).update(event.block_hashes)
            predicted = self._predicted.get(worker_id)
            if predicted:
                for h in event.block_hashes:
                    predicted.pop(h, None)
        elif isinstance(event, BlockRemoved):
            stored = self._stored.get(worker_id, set())
            predicted = self._predicted.get(worker_id, {})
            for h in event.block_hashes:
                stored.discard(h)
                predicted.pop(h, None)
        elif isinstance(event, AllCleared):
            self._forget_blocks(worker_id)

    def _forget_blocks(self, worker_id: str) -> None:
        self._stored.pop(worker_id, None)
        self._predicted.pop(worker_id, None)
