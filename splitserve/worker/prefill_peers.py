"""Which prefill workers a decode worker may open a KV session to.

A generate request names its prefill worker, but the decode worker never connects to an
address just because a request says so: that would let anyone who can reach the worker
API make it connect anywhere. With discovery, the target's worker id must be a prefill
worker registered there and the connection goes to the KV address *discovery* holds for
it. Without discovery, the target's KV address must be on the worker's `--kv-peers`
list (HOST for any port on that host, or HOST:PORT).
"""

from __future__ import annotations

import logging
import time

from splitserve.discovery import Discovery, DiscoveryError, WorkerRecord
from splitserve.worker.protocol import PrefillTarget

logger = logging.getLogger(__name__)

_REFRESH_S = 1.0   # a cached view younger than this answers a lookup without discovery


class UnknownPrefillWorker(ValueError):
    """The request names a prefill worker this decode worker does not know."""

    param = "prefill"


class PrefillPeers:
    def __init__(self, discovery: Discovery | None, static: tuple[str, ...]):
        self._discovery = discovery
        self._static = static
        self._known: dict[str, WorkerRecord] = {}
        self._listed_at = float("-inf")

    async def resolve(self, request_id: str, target: PrefillTarget) -> tuple[str, int]:
        """The (host, port) to fetch `target`'s KV from; raises UnknownPrefillWorker."""
        if self._discovery is None:
            return self._resolve_static(target)
        record = await self.record(request_id, target)
        return record.kv_host, record.kv_port

    async def record(self, request_id: str, target: PrefillTarget) -> WorkerRecord:
        """The target's discovery record (its KV address as discovery holds it, its API
        URL); raises UnknownPrefillWorker. A static --kv-peers list has no record."""
        if self._discovery is None:
            raise UnknownPrefillWorker(
                f"prefill worker {target.worker_id!r}: this decode worker has no --discovery "
                f"to find its record in")
        record = await self._lookup(target.worker_id, target, fresh=False)
        if record is None or (record.kv_host, record.kv_port) != (target.kv_host, target.kv_port):
            # Unknown or moved (restarted on another port): ask discovery itself.
            record = await self._lookup(target.worker_id, target, fresh=True)
        if record is None:
            raise UnknownPrefillWorker(
                f"prefill worker {target.worker_id!r} is not a prefill worker with a KV port "
                f"in this decode worker's discovery; refusing to connect to "
                f"{target.kv_host}:{target.kv_port}")
        if (record.kv_host, record.kv_port) != (target.kv_host, target.kv_port):
            logger.info("request_id=%s prefill worker %s is at %s:%d in discovery (the request "
                        "said %s:%d); using discovery's address", request_id,
                        target.worker_id, record.kv_host, record.kv_port, target.kv_host,
                        target.kv_port)
        return record

    async def _lookup(self, worker_id: str, target: PrefillTarget,
                      fresh: bool) -> WorkerRecord | None:
        if fresh or time.monotonic() - self._listed_at > _REFRESH_S:
            try:
                records = await self._discovery.list()
            except DiscoveryError as e:
                raise UnknownPrefillWorker(f"cannot check prefill worker {target.worker_id!r} "
                                           f"in discovery: {e}") from e
            self._known = {r.worker_id: r for r in records
                           if r.role == "prefill" and r.kv_host is not None}
            self._listed_at = time.monotonic()
        return self._known.get(worker_id)

    def _resolve_static(self, target: PrefillTarget) -> tuple[str, int]:
        address = f"{target.kv_host}:{target.kv_port}"
        if any(peer in (target.kv_host, address) for peer in self._static):
            return target.kv_host, target.kv_port
        allowed = ", ".join(self._static) or "none (no --discovery and no --kv-peers)"
        raise UnknownPrefillWorker(
            f"prefill KV address {address} is not one this decode worker may fetch from "
            f"(allowed: {allowed})")
