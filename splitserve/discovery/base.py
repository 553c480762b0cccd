"""The discovery interface: workers publish themselves, frontends find and watch them.

A real swap point (embedded file store, etcd, static list), so it is an ABC. Everything
is asyncio: workers and frontends already run an event loop, and a watch is naturally an
async iterator.
"""

from __future__ import annotations

import asyncio

from abc import ABC, abstractmethod
from typing import AsyncIterator

from splitserve.discovery.record import WatchEvent, WorkerRecord

# How long a worker that stopped heartbeating (died) stays listed, in whole seconds (etcd
# leases are): every backend's default and the --discovery-ttl flag's.
DEFAULT_TTL_S = 10


class DiscoveryError(Exception):
    """Discovery was misconfigured or misused, or its backend refused an operation."""


class Discovery(ABC):
    """A registry of live workers.

    Worker side: register() once, update() whenever state or load changes, deregister()
    (or close()) on clean shutdown. Between updates the backend keeps the registration
    alive by itself (file heartbeats, etcd lease keep-alives); when the worker's process
    dies, the registration lapses within the backend's TTL.

    Frontend side: list() for a snapshot, watch() to follow changes.
    """

    @abstractmethod
    async def register(self, record: WorkerRecord) -> None:
        """Publish `record` and keep it alive until deregister() or close()."""

    @abstractmethod
    async def update(self, record: WorkerRecord) -> None:
        """Replace the published record of an already registered worker (same worker_id)."""

    @abstractmethod
    async def deregister(self, worker_id: str) -> None:
        """Withdraw a registration made through this instance. Best effort: if the
        backend is unreachable, the registration lapses by TTL instead."""

    @abstractmethod
    async def list(self) -> list[WorkerRecord]:
        """The workers registered now (live ones only), sorted by worker_id."""

    @abstractmethod
    def watch(self) -> AsyncIterator[WatchEvent]:
        """Follow the registry: first a 'put' for every worker registered now, then one
        event per change. Ends when close() is called."""

    @abstractmethod
    async def close(self) -> None:
        """Deregister everything this instance registered, stop its background work and
        end its watches."""

    async def __aenter__(self) -> "Discovery":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def diff_snapshots(old: dict[str, WorkerRecord],
                   new: dict[str, WorkerRecord]) -> list[WatchEvent]:
    """The events that turn snapshot `old` into `new` (both keyed by worker_id). Backends
    that poll, or that must resynchronise after losing their watch, report changes this
    way so that a watcher never sees a worker twice or misses one that went away."""
    events = [WatchEvent("delete", wid) for wid in sorted(old.keys() - new.keys())]
    events += [WatchEvent("put", wid, rec) for wid, rec in sorted(new.items())
               if old.get(wid) != rec]
    return events


async def sleep_unless_closed(closed: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `closed` is set first: background loops of a backend
    must stop promptly on close()."""
    try:
        await asyncio.wait_for(closed.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def stop_and_withdraw(discovery: Discovery, closed: asyncio.Event,
                            background: asyncio.Task | None, own_ids) -> bool:
    """The shared first half of a backend's close(): mark it closed, stop its background
    keep-alive task, withdraw what it registered. False when it was already closed."""
    if closed.is_set():
        return False
    closed.set()
    if background is not None:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
    for worker_id in list(own_ids):
        await discovery.deregister(worker_id)
    return True
