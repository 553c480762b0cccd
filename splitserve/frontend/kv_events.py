"""The frontend's picture of every worker's prefix cache: one subscription to each
prefill/both worker's GET /kv_events, fed into the router's KVIndex.

A worker streams NDJSON KVEventBatches: first a snapshot (AllCleared, then every cached
block), then live batches. A connection that breaks is re-opened with backoff; the new
connection's snapshot replaces whatever the index believed, so events missed while
disconnected cannot leave the index wrong. A worker that leaves the set (discovery
dropped it) is unsubscribed and forgotten by the index.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import msgspec

from splitserve.frontend.workers import WorkerStatus
from splitserve.kvtypes.events import decode_batch
from splitserve.router import KVIndex

logger = logging.getLogger(__name__)

_ROLES_WITH_PREFIX_CACHE = ("prefill", "both")


class _BadReply(Exception):
    """A worker answered /kv_events with something other than an event stream."""


class KVEventFeed:
    def __init__(self, http: httpx.AsyncClient, index: KVIndex,
                 retry_min_s: float = 0.2, retry_max_s: float = 5.0):
        self._http = http
        self.index = index
        self._retry = (retry_min_s, retry_max_s)
        self._subscriptions: dict[str, tuple[str, asyncio.Task]] = {}   # worker_id -> (url, task)

    def sync(self, workers: list[WorkerStatus]) -> None:
        """Subscribe to every worker that has a prefix cache routing cares about (known
        role, answered /info once) and unsubscribe from the ones no longer listed."""
        wanted = {w.worker_id: w.url for w in workers
                  if w.info is not None and w.role in _ROLES_WITH_PREFIX_CACHE}
        for worker_id, (url, task) in list(self._subscriptions.items()):
            if wanted.get(worker_id) != url:
                task.cancel()
                del self._subscriptions[worker_id]
                self.index.remove_worker(worker_id)
        for worker_id, url in wanted.items():
            if worker_id not in self._subscriptions:
                task = asyncio.create_task(self._follow(worker_id, url),
                                           name=f"kv-events-{worker_id}")
                self._subscriptions[worker_id] = (url, task)

    async def close(self) -> None:
        tasks = [task for _, task in self._subscriptions.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subscriptions.clear()

    async def _follow(self, worker_id: str, url: str) -> None:
        retry_s, failing = self._retry[0], False
        while True:
            try:
                async with self._http.stream("GET", f"{url}/kv_events") as resp:
                    if resp.status_code != 200:
                        raise _BadReply(f"HTTP {resp.status_code}")
                    first = True
                    async for line in resp.aiter_lines():
                        if not line:
                            continue
                        # The worker names itself; routing names it by what /info said.
                        batch = msgspec.structs.replace(decode_batch(line), worker_id=worker_id)
                        if first:
                            # NOTE: the snapshot that opens every connection is the whole
                            # truth: drop the old position too, or a snapshot numbered
                            # below the last seq seen would be ignored as a duplicate.
                            self.index.remove_worker(worker_id)
                            first = False
                            if failing:
                                logger.info("KV events of worker %s resumed", worker_id)
                            failing, retry_s = False, self._retry[0]
                        self.index.apply(batch)
                    why = "the stream ended"
            except (httpx.HTTPError, msgspec.MsgspecError, _BadReply) as e:
                why = repr(e)
            # One warning per outage: a dead worker is retried until discovery drops it.
            if not failing:
                logger.warning("KV events of worker %s (%s): %s; reconnecting (backoff up to "
                               "%.0fs)", worker_id, url, why, self._retry[1])
                failing = True
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, self._retry[1])
