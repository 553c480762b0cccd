"""Keeps this worker's record in discovery, from start-up to a clean shutdown.

The record is registered once the HTTP server is bound (state 'loading'), republished
with fresh load every ttl/3, and at once when the state changes (ready when /health
would answer 200, failed when the engine died), and withdrawn on a clean shutdown so
routers stop choosing this worker before it stops serving. A worker that dies without
a shutdown lapses by the backend's TTL (file heartbeats, etcd lease).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from splitserve.discovery import Discovery, DiscoveryError, WorkerRecord

logger = logging.getLogger(__name__)

# How often the worker's state is compared with the published one: readiness reaches
# routers this fast. Load alone is republished every ttl/3.
_STATE_POLL_S = 0.2


class WorkerRegistration:
    def __init__(self, discovery: Discovery, worker_id: str, role: str, advertised_host: str,
                 ttl_s: float, on_fatal: Callable[[str], None], restarts: int = 0):
        """on_fatal(reason) is called on the event loop when the first registration fails
        (discovery unreachable or refusing): a worker nobody can find must not run on.
        restarts: how many times a supervisor restarted this worker (published as is)."""
        self.discovery = discovery
        self.worker_id = worker_id
        self.role = role
        self.advertised_host = advertised_host
        self.interval_s = ttl_s / 3
        self.on_fatal = on_fatal
        self.restarts = restarts
        # NOTE: set by whoever binds the HTTP socket, before start(): the record's URLs
        # need the bound port, and `--port 0` picks it only at bind time.
        self.api_port: int | None = None
        self._task: asyncio.Task | None = None
        self._registered = False

    def base_record(self) -> WorkerRecord:
        host = f"[{self.advertised_host}]" if ":" in self.advertised_host else self.advertised_host
        api_url = f"http://{host}:{self.api_port}"
        return WorkerRecord(worker_id=self.worker_id, role=self.role, api_url=api_url,
                            metrics_url=f"{api_url}/metrics", model_name="", restarts=self.restarts)

    async def start(self, describe: Callable[[WorkerRecord], WorkerRecord]) -> None:
        """Register describe(base_record()) and keep it fresh; describe fills in state,
        model, KV address and load."""
        if self.api_port is None:
            raise RuntimeError("WorkerRegistration.api_port must be set before start()")
        base = self.base_record()
        record = describe(base)
        try:
            await self.discovery.register(record)
        except DiscoveryError as e:
            self.on_fatal(f"cannot register worker {self.worker_id} in discovery: {e}")
            return
        self._registered = True
        logger.info("registered in discovery as %s (%s, %s)", self.worker_id, self.role, base.api_url)
        self._task = asyncio.create_task(self._refresh(base, describe, record), name="registration")

    async def stop(self) -> None:
        """Withdraw the record (idempotent). Best effort: an unreachable backend lets it
        lapse by TTL instead."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._registered:
            self._registered = False
            try:
                await self.discovery.deregister(self.worker_id)
                logger.info("deregistered %s from discovery", self.worker_id)
            except DiscoveryError as e:
                logger.warning("could not deregister %s (it lapses by TTL): %s", self.worker_id, e)
        await self.discovery.close()

    async def _refresh(self, base: WorkerRecord, describe, published: WorkerRecord) -> None:
        last = time.monotonic()
        failing = False
        while True:
            await asyncio.sleep(_STATE_POLL_S)
            record = describe(base)
            now = time.monotonic()
            due = now - last >= self.interval_s
            if not due and (failing or record.state == published.state):
                continue
            last = now
            try:
                await self.discovery.update(record)
            except DiscoveryError as e:
                # The backend keeps the registration alive (or lapses it) by itself; we
                # only missed one refresh, and retry every interval. Said once per outage.
                if not failing:
                    logger.warning("discovery update for %s failed (retrying): %s", self.worker_id, e)
                failing = True
                continue
            if failing:
                logger.info("discovery updates for %s work again", self.worker_id)
                failing = False
            if record.state != published.state:
                logger.info("discovery: %s is %s", self.worker_id, record.state)
            published = record
