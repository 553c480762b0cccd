"""Publishes the engine's KV cache events to routers (GET /kv_events, NDJSON).

Each line is one `splitserve.kvtypes.events.KVEventBatch` (its JSON codec) carrying this
worker's id, its epoch (the process start time in ns) and a seq.

NOTE: seq is the version of the prefix cache: live batch n moves it from version n-1 to
n. A subscriber's first batch is a snapshot of version v with seq v (AllCleared, then
every cached block); the live batches v+1, v+2, ... follow, contiguous. A router that
resubscribes after losing batches therefore sees a gap (it resyncs from the snapshot),
and one that lost nothing sees a duplicate of the version it already has.

Threads: events are drained and numbered on the engine thread, so a snapshot taken there
meets the live stream exactly; they reach the event loop through call_soon_threadsafe
(FIFO), and subscribers live on the loop only. A subscriber whose bounded queue
overflows (a slow reader) is dropped: its stream ends, it resubscribes and starts again
from a fresh snapshot. The engine never waits for a reader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from splitserve.kvtypes.events import KVEvent, KVEventBatch, encode_batch
from splitserve.worker.engine_api import WorkerEngine

logger = logging.getLogger(__name__)

# Live batches (about one per engine step) a subscriber may lag behind before it is
# dropped: seconds of engine work, far more than a healthy reader ever falls behind.
DEFAULT_MAX_QUEUED = 1024


class _Subscriber:
    def __init__(self, max_queued: int):
        # (seq, line), or None: the stream ends (overflow or shutdown).
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(max_queued)

    def end(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class KVEventPublisher:
    def __init__(self, worker_id: str, max_queued: int = DEFAULT_MAX_QUEUED):
        self.worker_id = worker_id
        self.epoch = time.time_ns()
        self.max_queued = max_queued
        self._version = 0                       # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: set[_Subscriber] = set()   # event loop only
        self._closed = False

    def start(self) -> None:
        """Call on the event loop before the engine starts."""
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        """End every stream (the worker shuts down: a stream would never end by itself)."""
        self._closed = True
        for sub in self._subscribers:
            sub.end()
        self._subscribers.clear()

    # --- engine thread --------------------------------------------------------------------
    def publish(self, events: list[KVEvent]) -> None:
        """The engine's on_kv_events: number the events and hand them to the loop."""
        if not events:
            return
        self._version += 1
        batch = KVEventBatch(self.worker_id, self.epoch, self._version, events)
        self._loop.call_soon_threadsafe(self._fanout, batch)

    def _snapshot(self, events: list[KVEvent]) -> KVEventBatch:
        # WorkerEngine.kv_snapshot has published every earlier change (and no later one),
        # so the version now is exactly the one the snapshot reflects.
        return KVEventBatch(self.worker_id, self.epoch, self._version, events)

    # --- event loop -----------------------------------------------------------------------
    def _fanout(self, batch: KVEventBatch) -> None:
        if not self._subscribers:
            return
        item = (batch.seq, encode_batch(batch) + b"\n")
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(item)
            except asyncio.QueueFull:
                logger.warning("KV event subscriber fell %d batches behind; dropping its "
                               "stream so that it resubscribes from a fresh snapshot",
                               self.max_queued)
                self._subscribers.discard(sub)
                sub.end()

    async def subscribe(self, engine: WorkerEngine) -> AsyncIterator[bytes]:
        """The NDJSON lines of one subscription: the snapshot, then live batches. Raises
        (before the first line) EngineDeadError when the engine is not ready."""
        sub = _Subscriber(self.max_queued)
        # Registered before the snapshot is taken: every batch numbered after it is queued
        # here (batches up to its version may be queued too, and are skipped).
        if self._closed:
            sub.end()       # shutting down: the snapshot, then the end
        else:
            self._subscribers.add(sub)
        try:
            snapshot = await engine.kv_snapshot(self._snapshot)
        except BaseException:
            self._subscribers.discard(sub)
            raise
        return self._stream(sub, snapshot)

    async def _stream(self, sub: _Subscriber, snapshot: KVEventBatch) -> AsyncIterator[bytes]:
        try:
            yield encode_batch(snapshot) + b"\n"
            while (item := await sub.queue.get()) is not None:
                seq, line = item
                if seq > snapshot.seq:
                    yield line
        finally:
            self._subscribers.discard(sub)
