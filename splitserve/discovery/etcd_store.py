"""etcd discovery, for many machines: one key per worker, attached to a lease.

Key: /splitserve/<namespace>/workers/<worker_id>, value: the JSON record. The worker's
lease (TTL default DEFAULT_TTL_S) is kept alive from this process; when the process dies the
keep-alives stop, etcd expires the lease and deletes the key, and every watching frontend
sees the delete. Watchers take a snapshot and then watch from the snapshot's revision, so
no change falls between the two; after any watch failure they resynchronise the same way
and report the difference, so a frontend survives an etcd restart without a stale view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import aetcd.exceptions
import aetcd.rtypes
import msgspec

from splitserve.discovery.base import (DEFAULT_TTL_S, Discovery, DiscoveryError, diff_snapshots,
                                       sleep_unless_closed, stop_and_withdraw)
from splitserve.discovery.etcd_client import EtcdAuth, EtcdClient
from splitserve.discovery.record import WatchEvent, WorkerRecord, decode_record, encode_record

logger = logging.getLogger(__name__)

_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 5.0
# The client's failures: gRPC errors come out of aetcd mapped to ClientError subclasses.
_ETCD_ERRORS = (aetcd.exceptions.ClientError,)
# gRPC backs off up to 120 s between reconnects by default; discovery must notice an etcd
# that came back within a keep-alive period or two, before the leases it restored lapse.
_CHANNEL_OPTIONS = {"grpc.initial_reconnect_backoff_ms": 200, "grpc.min_reconnect_backoff_ms": 200,
                    "grpc.max_reconnect_backoff_ms": 1000}


@dataclass(frozen=True)
class EtcdDiscoveryConfig:
    """ttl_s is whole seconds (etcd leases are); keepalive_s=None means ttl_s / 3, so two
    keep-alives may be lost before the worker disappears. rpc_timeout_s bounds each call,
    so an unreachable etcd fails an operation instead of hanging it. auth: TLS and
    user/password (etcd_client.py); the default is plaintext without authentication."""

    host: str
    port: int = 2379
    namespace: str = "default"
    ttl_s: int = DEFAULT_TTL_S
    keepalive_s: float | None = None
    rpc_timeout_s: float = 5.0
    auth: EtcdAuth = field(default_factory=EtcdAuth)

    def __post_init__(self) -> None:
        if not self.host:
            raise DiscoveryError("etcd discovery needs a host: etcd://HOST:PORT")
        if not 0 < self.port < 65536:
            raise DiscoveryError(f"etcd port must be in 1..65535, got {self.port}")
        if not self.namespace or "/" in self.namespace:
            raise DiscoveryError(f"namespace must be non-empty without '/', got {self.namespace!r}")
        if not isinstance(self.ttl_s, int) or self.ttl_s < 1:
            raise DiscoveryError(f"etcd lease ttl_s must be a positive integer, got {self.ttl_s!r}")
        if self.keepalive_s is None:
            object.__setattr__(self, "keepalive_s", self.ttl_s / 3)
        if not 0 < self.keepalive_s < self.ttl_s:
            raise DiscoveryError(
                f"keepalive_s must be in (0, ttl_s={self.ttl_s}), got {self.keepalive_s}")
        if self.rpc_timeout_s <= 0:
            raise DiscoveryError(f"rpc_timeout_s must be positive, got {self.rpc_timeout_s}")

    @property
    def prefix(self) -> bytes:
        return f"/splitserve/{self.namespace}/workers/".encode()


class EtcdDiscovery(Discovery):
    def __init__(self, config: EtcdDiscoveryConfig) -> None:
        self.config = config
        # aetcd connects lazily on the first call, so constructing this touches no network.
        self._client = EtcdClient(config.host, config.port, config.auth, config.rpc_timeout_s,
                                  _CHANNEL_OPTIONS)
        self._own: dict[str, WorkerRecord] = {}
        self._leases: dict[str, int] = {}
        # Serialises changes to this instance's registrations: a keep-alive that finds its
        # lease gone must not re-create a worker that deregistered meanwhile.
        self._lock = asyncio.Lock()
        self._keepalive: asyncio.Task | None = None
        self._failing: set[str] = set()     # workers whose keep-alive is failing now
        self._closed = asyncio.Event()

    def _key(self, worker_id: str) -> bytes:
        return self.config.prefix + worker_id.encode()

    async def register(self, record: WorkerRecord) -> None:
        self._check_open()
        async with self._lock:
            self._own[record.worker_id] = record
            try:
                await self._grant_and_put(record)
            except _ETCD_ERRORS as e:
                # A lease granted before the failure lapses on its own.
                del self._own[record.worker_id]
                self._leases.pop(record.worker_id, None)
                raise DiscoveryError(
                    f"cannot register worker {record.worker_id!r} in etcd at "
                    f"{self.config.host}:{self.config.port}: {e}") from e
        if self._keepalive is None:
            self._keepalive = asyncio.create_task(self._keep_alive_forever(),
                                                  name="etcd-discovery-keepalive")

    async def update(self, record: WorkerRecord) -> None:
        self._check_open()
        async with self._lock:
            if record.worker_id not in self._own:
                raise DiscoveryError(f"update of unregistered worker {record.worker_id!r}")
            # Kept even if the write fails: the next update, or a re-registration after
            # the lease lapsed, publishes the latest record.
            self._own[record.worker_id] = record
            try:
                await self._put(record, self._leases[record.worker_id])
            except _ETCD_ERRORS as e:
                raise DiscoveryError(f"cannot update worker {record.worker_id!r} in etcd: {e}") from e

    async def deregister(self, worker_id: str) -> None:
        async with self._lock:
            if self._own.pop(worker_id, None) is None:
                return
            lease = self._leases.pop(worker_id)
            try:
                # Revoking deletes the key at once; watchers see the delete now, not at TTL.
                await self._client.revoke_lease(lease)
            except _ETCD_ERRORS as e:
                logger.warning("could not revoke the lease of worker %s (%s); it expires "
                               "within %d s", worker_id, e, self.config.ttl_s)

    async def list(self) -> list[WorkerRecord]:
        try:
            records, _ = await self._snapshot()
        except _ETCD_ERRORS as e:
            raise DiscoveryError(f"cannot list workers in etcd: {e}") from e
        return sorted(records.values(), key=lambda r: r.worker_id)

    async def watch(self) -> AsyncIterator[WatchEvent]:
        known: dict[str, WorkerRecord] = {}
        retry_s = _RETRY_MIN_S
        while not self._closed.is_set():
            try:
                current, revision = await self._snapshot()
                for event in diff_snapshots(known, current):
                    yield event
                known = current
                watch = await self._client.watch_prefix(self.config.prefix,
                                                        start_revision=revision + 1)
                try:
                    async for change in watch:
                        retry_s = _RETRY_MIN_S
                        event = self._to_event(change)
                        # A delete of a key we never reported (its record was malformed)
                        # is no news to the watcher.
                        if event is None or (event.kind == "delete"
                                             and event.worker_id not in known):
                            continue
                        if event.kind == "put":
                            known[event.worker_id] = event.record
                        else:
                            known.pop(event.worker_id, None)
                        yield event
                finally:
                    # After close() the client itself has ended every watch (and cannot
                    # cancel one any more).
                    if not self._closed.is_set():
                        await watch.cancel()
            except _ETCD_ERRORS as e:
                if self._closed.is_set():
                    break
                logger.warning("etcd watch on %s failed (%s); resynchronising in %.1f s",
                               self.config.prefix.decode(), e, retry_s)
                await sleep_unless_closed(self._closed, retry_s)
                retry_s = min(retry_s * 2, _RETRY_MAX_S)

    async def close(self) -> None:
        if not await stop_and_withdraw(self, self._closed, self._keepalive, self._own):
            return
        # Also ends this instance's watches: the client's watcher delivers end-of-stream.
        await self._client.close()

    # --- internals ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise DiscoveryError("etcd discovery is closed")

    async def _put(self, record: WorkerRecord, lease: int) -> None:
        record = msgspec.structs.replace(record, last_heartbeat=time.time())
        await self._client.put(self._key(record.worker_id), encode_record(record), lease=lease)

    async def _grant_and_put(self, record: WorkerRecord) -> None:
        lease = await self._client.lease(self.config.ttl_s)
        self._leases[record.worker_id] = lease.id
        await self._put(record, lease.id)

    async def _keep_alive_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.keepalive_s)
            async with self._lock:
                for worker_id, record in list(self._own.items()):
                    try:
                        reply = await self._client.refresh_lease(self._leases[worker_id])
                        if reply is None or reply.TTL <= 0:
                            # The lease lapsed (this process stalled past the TTL, or the
                            # lease was revoked): the key is gone, so register afresh.
                            logger.warning("lease of worker %s lapsed; registering again",
                                           worker_id)
                            await self._grant_and_put(record)
                    except _ETCD_ERRORS as e:
                        # Keep trying: the lease survives until its TTL, and a re-grant
                        # follows on the first keep-alive after etcd is back. Warn once
                        # per outage, not every keep-alive period.
                        if worker_id not in self._failing:
                            self._failing.add(worker_id)
                            logger.warning("etcd keep-alive for worker %s failed: %s; retrying "
                                           "every %.1f s", worker_id, e, self.config.keepalive_s)
                        continue
                    if worker_id in self._failing:
                        self._failing.discard(worker_id)
                        logger.info("etcd keep-alive for worker %s recovered", worker_id)

    async def _snapshot(self) -> tuple[dict[str, WorkerRecord], int]:
        response = await self._client.get_prefix(self.config.prefix)
        records = {}
        for kv in response:
            record = self._decode(kv.key, kv.value)
            if record is not None:
                records[record.worker_id] = record
        return records, response.header.revision

    def _to_event(self, change) -> WatchEvent | None:
        worker_id = change.kv.key[len(self.config.prefix):].decode()
        if change.kind == aetcd.rtypes.EventKind.DELETE:
            return WatchEvent("delete", worker_id)
        record = self._decode(change.kv.key, change.kv.value)
        return None if record is None else WatchEvent("put", worker_id, record)

    def _decode(self, key: bytes, value: bytes) -> WorkerRecord | None:
        try:
            record = decode_record(value)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            logger.warning("ignoring malformed worker record at %s: %s", key.decode(), e)
            return None
        if self._key(record.worker_id) != key:
            logger.warning("ignoring worker record at %s: it names worker %r",
                           key.decode(), record.worker_id)
            return None
        return record
