"""Static discovery: a fixed list of worker API URLs, for tests and simple setups.

Nothing is known about these workers but their URLs, so their records say state
'unknown' and the caller health-checks them (and reads model details from /info).
An entry may name its role as `ROLE=URL` (prefill, decode, both); the default is 'both'.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, get_args
from urllib.parse import urlsplit

from splitserve.discovery.base import Discovery, DiscoveryError
from splitserve.discovery.record import Role, WatchEvent, WorkerRecord

_ROLES = get_args(Role)


@dataclass(frozen=True)
class StaticDiscoveryConfig:
    entries: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        if not self.entries:
            raise DiscoveryError("static discovery needs at least one worker URL")
        ids = [r.worker_id for r in self.records()]
        if len(set(ids)) != len(ids):
            raise DiscoveryError(f"static discovery lists a worker twice: {', '.join(self.entries)}")

    def records(self) -> list[WorkerRecord]:
        return [_record(entry) for entry in self.entries]


def _record(entry: str) -> WorkerRecord:
    role, sep, url = entry.partition("=")
    if not sep:
        role, url = "both", entry
    elif role not in _ROLES:
        raise DiscoveryError(f"static discovery entry {entry!r}: role must be one of {_ROLES}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise DiscoveryError(
            f"static discovery entry {entry!r}: expected http://HOST:PORT (optionally ROLE=...)")
    url = url.rstrip("/")
    # host:port names the worker: stable across restarts and readable in /cluster.
    return WorkerRecord(worker_id=parts.netloc, role=role, api_url=url,
                        metrics_url=f"{url}/metrics", model_name="", state="unknown")


class StaticDiscovery(Discovery):
    """Read-only: workers in a static list cannot register themselves."""

    def __init__(self, config: StaticDiscoveryConfig) -> None:
        self.config = config
        self._records = sorted(config.records(), key=lambda r: r.worker_id)
        self._closed = asyncio.Event()

    async def register(self, record: WorkerRecord) -> None:
        raise DiscoveryError("static discovery is read-only: list the worker's URL instead")

    async def update(self, record: WorkerRecord) -> None:
        raise DiscoveryError("static discovery is read-only: list the worker's URL instead")

    async def deregister(self, worker_id: str) -> None:
        raise DiscoveryError("static discovery is read-only: list the worker's URL instead")

    async def list(self) -> list[WorkerRecord]:
        return list(self._records)

    async def watch(self) -> AsyncIterator[WatchEvent]:
        for record in self._records:
            yield WatchEvent("put", record.worker_id, record)
        await self._closed.wait()

    async def close(self) -> None:
        self._closed.set()
