"""The frontend's connection to its workers.

Knows a fixed list of worker URLs (a router and discovery replace that list later),
polls their /health and /info, and opens token streams on a ready worker. Nothing here
knows about OpenAI: it speaks worker.protocol only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec

from splitserve.worker import protocol as p

logger = logging.getLogger(__name__)


class WorkerUnavailable(Exception):
    """No worker can take the request (loading, failed, unreachable, or lost mid-stream)."""


class WorkerRejected(Exception):
    """The worker refused the request as invalid (its 400); `param` names the field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class WorkerClient:
    def __init__(self, urls: list[str], poll_interval_s: float = 0.5):
        if not urls:
            raise ValueError("at least one worker URL is needed")
        self._urls = [u.rstrip("/") for u in urls]
        self._poll_interval_s = poll_interval_s
        self._ready: dict[str, p.WorkerInfo] = {}
        self._not_ready: dict[str, str] = {u: "not contacted yet" for u in self._urls}
        self._turn = itertools.count()
        # No read timeout: a long prefill legitimately sends nothing for minutes.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._poller: asyncio.Task | None = None
        self.first_ready = asyncio.Event()

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever(), name="worker-health")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self._http.aclose()

    def info(self) -> p.WorkerInfo | None:
        """What the ready workers serve (they all serve the same model)."""
        return next(iter(self._ready.values()), None)

    def unavailable_reason(self) -> str | None:
        """None when some worker is ready, else why not, per worker."""
        if self._ready:
            return None
        return "; ".join(f"worker {u}: {r}" for u, r in self._not_ready.items())

    def pick(self) -> str:
        ready = list(self._ready)
        if not ready:
            raise WorkerUnavailable(f"no worker is ready ({self.unavailable_reason()})")
        return ready[next(self._turn) % len(ready)]

    @asynccontextmanager
    async def stream(self, url: str, request: p.GenerateRequest) -> AsyncIterator[AsyncIterator[p.GenerateChunk]]:
        """Open a generate stream. Leaving the context closes the connection, which makes
        the worker abort the request if it has not finished."""
        try:
            async with self._http.stream("POST", f"{url}/generate", content=p.encode(request),
                                         headers={"content-type": "application/json"}) as resp:
                if resp.status_code != 200:
                    await self._raise_for(url, resp)
                yield self._chunks(url, resp)
        except httpx.HTTPError as e:
            self._mark_down(url, f"unreachable: {e!r}")
            raise WorkerUnavailable(f"worker {url} failed: {e!r}") from e

    async def _chunks(self, url: str, resp: httpx.Response) -> AsyncIterator[p.GenerateChunk]:
        async for line in resp.aiter_lines():
            if line:
                yield p.decode(line, p.GenerateChunk)
        # A stream must end with a finish_reason or error chunk; the caller checks that.

    async def _raise_for(self, url: str, resp: httpx.Response) -> None:
        body = await resp.aread()
        if resp.status_code == 400:
            err = p.decode(body, p.WorkerError)
            raise WorkerRejected(err.message, err.param)
        reason = body.decode(errors="replace")
        try:
            reason = p.decode(body, p.WorkerHealth).reason or reason
        except msgspec.MsgspecError:
            pass
        self._mark_down(url, f"HTTP {resp.status_code}: {reason}")
        raise WorkerUnavailable(f"worker {url} answered {resp.status_code}: {reason}")

    def _mark_down(self, url: str, reason: str) -> None:
        if self._ready.pop(url, None) is not None:
            logger.warning("worker %s is no longer usable: %s", url, reason)
        self._not_ready[url] = reason

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(u) for u in self._urls))
            await asyncio.sleep(self._poll_interval_s)

    async def _poll(self, url: str) -> None:
        try:
            resp = await self._http.get(f"{url}/health", timeout=5.0)
            if resp.status_code != 200:
                health = p.decode(resp.content, p.WorkerHealth)
                self._mark_down(url, health.reason or health.status)
                return
            if url not in self._ready:
                info = p.decode((await self._http.get(f"{url}/info", timeout=5.0)).content, p.WorkerInfo)
                self._ready[url] = info
                self._not_ready.pop(url, None)
                logger.info("worker %s ready: model %s, max_model_len %d", url, info.model_name,
                            info.max_model_len)
                self.first_ready.set()
        except (httpx.HTTPError, msgspec.MsgspecError) as e:
            self._mark_down(url, f"unreachable: {e!r}")
