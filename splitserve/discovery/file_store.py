"""Embedded discovery: one directory of JSON worker records, no server.

Each worker owns the file `<worker_id>.json` and rewrites it every heartbeat with a fresh
`last_heartbeat`; a record older than the TTL belongs to a worker that died and is
ignored. Writes go to a temporary file that is then renamed over the record, so a reader
in another process sees the old record or the new one, never half of one. Watches poll.

Disk I/O runs on this store's own thread, never on the event loop's default executor:
whatever else a process parks there (slow work, blocked threads) cannot delay a heartbeat
until the record lapses.

Files of workers that died stay on disk (ignored once expired) until a worker with the
same id registers again: a reader deleting them could race with that worker's rewrite.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import msgspec

from splitserve.discovery.base import (DEFAULT_TTL_S, Discovery, DiscoveryError, diff_snapshots,
                                       sleep_unless_closed, stop_and_withdraw)
from splitserve.discovery.record import WatchEvent, WorkerRecord, decode_record, encode_record

logger = logging.getLogger(__name__)

_SUFFIX = ".json"


@dataclass(frozen=True)
class FileDiscoveryConfig:
    """heartbeat_s=None means ttl_s / 3: two heartbeats may be lost (a slow disk, a busy
    event loop) before readers drop the worker."""

    directory: Path
    ttl_s: float = DEFAULT_TTL_S
    heartbeat_s: float | None = None
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        if self.ttl_s <= 0:
            raise DiscoveryError(f"file discovery ttl_s must be positive, got {self.ttl_s}")
        if self.heartbeat_s is None:
            object.__setattr__(self, "heartbeat_s", self.ttl_s / 3)
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise DiscoveryError(
                f"heartbeat_s must be in (0, ttl_s={self.ttl_s}), got {self.heartbeat_s}")
        if self.poll_s <= 0:
            raise DiscoveryError(f"poll_s must be positive, got {self.poll_s}")


class FileDiscovery(Discovery):
    def __init__(self, config: FileDiscoveryConfig) -> None:
        self.config = config
        self._own: dict[str, WorkerRecord] = {}
        # Serialises writes and unlinks: a heartbeat in flight must not re-create the file
        # of a worker that deregistered meanwhile.
        self._lock = asyncio.Lock()
        self._renewer: asyncio.Task | None = None
        self._closed = asyncio.Event()
        self._bad_files: set[str] = set()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="file-discovery")

    async def _run(self, fn, *args):
        try:
            future = asyncio.get_running_loop().run_in_executor(self._io, fn, *args)
        except RuntimeError as e:    # the I/O thread is shut down: close() ran
            raise DiscoveryError("file discovery is closed") from e
        return await future

    async def register(self, record: WorkerRecord) -> None:
        self._check_open()
        async with self._lock:
            self._own[record.worker_id] = record
            await self._run(self._write, record)
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="file-discovery-renew")

    async def update(self, record: WorkerRecord) -> None:
        self._check_open()
        async with self._lock:
            if record.worker_id not in self._own:
                raise DiscoveryError(f"update of unregistered worker {record.worker_id!r}")
            self._own[record.worker_id] = record
            await self._run(self._write, record)

    async def deregister(self, worker_id: str) -> None:
        async with self._lock:
            if self._own.pop(worker_id, None) is not None:
                # On the I/O thread, behind any write already queued there: a heartbeat
                # whose caller was cancelled (the lock then freed) still runs to its
                # rename, and an unlink that overtook it would be undone by it.
                await self._run(self._path(worker_id).unlink, True)

    async def list(self) -> list[WorkerRecord]:
        return sorted((await self._run(self._read_live)).values(),
                      key=lambda r: r.worker_id)

    async def watch(self) -> AsyncIterator[WatchEvent]:
        known: dict[str, WorkerRecord] = {}
        while not self._closed.is_set():
            current = await self._run(self._read_live)
            for event in diff_snapshots(known, current):
                yield event
            known = current
            await sleep_unless_closed(self._closed, self.config.poll_s)

    async def close(self) -> None:
        await stop_and_withdraw(self, self._closed, self._renewer, self._own)
        self._io.shutdown(wait=False)

    # --- internals ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise DiscoveryError("file discovery is closed")

    def _path(self, worker_id: str) -> Path:
        return self.config.directory / f"{worker_id}{_SUFFIX}"

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            async with self._lock:
                for record in list(self._own.values()):
                    try:
                        await self._run(self._write, record)
                    except OSError as e:
                        # Keep trying: a transient disk error must not end the heartbeat;
                        # readers drop the worker only if it lasts longer than the TTL.
                        logger.warning("heartbeat for worker %s failed: %s", record.worker_id, e)

    def _write(self, record: WorkerRecord) -> None:
        record = msgspec.structs.replace(record, last_heartbeat=time.time())
        directory = self.config.directory
        directory.mkdir(parents=True, exist_ok=True)
        # A dot-prefixed name in the same directory: readers skip it, and rename within
        # one filesystem is atomic.
        fd, tmp = tempfile.mkstemp(prefix=f".{record.worker_id}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode_record(record))
            os.replace(tmp, self._path(record.worker_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read_live(self) -> dict[str, WorkerRecord]:
        try:
            names = os.listdir(self.config.directory)
        except FileNotFoundError:
            return {}
        now = time.time()
        live: dict[str, WorkerRecord] = {}
        for name in names:
            if name.startswith(".") or not name.endswith(_SUFFIX):
                continue
            try:
                record = decode_record((self.config.directory / name).read_bytes())
            except FileNotFoundError:
                continue            # deregistered between listdir and read
            except (OSError, msgspec.ValidationError, msgspec.DecodeError) as e:
                self._warn_bad(name, str(e))
                continue
            if record.worker_id + _SUFFIX != name:
                self._warn_bad(name, f"holds worker_id {record.worker_id!r}")
                continue
            if now - record.last_heartbeat <= self.config.ttl_s:
                live[record.worker_id] = record
        return live

    def _warn_bad(self, name: str, why: str) -> None:
        # Once per file: watches poll every poll_s and would repeat it forever.
        if name not in self._bad_files:
            self._bad_files.add(name)
            logger.warning("ignoring discovery file %s: %s", self.config.directory / name, why)
