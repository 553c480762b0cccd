"""The frontend's connection to its workers.

Knows a fixed list of worker URLs (discovery replaces that list later), polls their
/health and /info into one WorkerStatus each, and opens token streams. A worker's reply
to /generate is sorted into what the caller can do about it: try another worker
(WorkerUnavailable), tell the client its request is invalid (WorkerRejected), or tell the
client the KV transfer failed (KVTransferFailed). Nothing here knows about OpenAI or
about routing: it speaks worker.protocol only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec

from splitserve.frontend.workers import WorkerState, WorkerStatus
from splitserve.worker import protocol as p

logger = logging.getLogger(__name__)


class WorkerUnavailable(Exception):
    """This worker cannot take the request now (full, loading, failed, unreachable); another
    worker may. Raised only before the worker produced anything for the request."""


class WorkerRejected(Exception):
    """The worker refused the request as invalid (its 400); `param` names the field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class KVTransferFailed(Exception):
    """The decode worker could not get the prompt's KV and its policy is to fail (its 502)."""


class WorkerClient:
    def __init__(self, urls: list[str], poll_interval_s: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None):
        if not urls:
            raise ValueError("at least one worker URL is needed")
        self._workers = {u.rstrip("/"): WorkerStatus(u.rstrip("/")) for u in urls}
        self._poll_interval_s = poll_interval_s
        # No read timeout: a long prefill legitimately sends nothing for minutes.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None), transport=transport,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._poller: asyncio.Task | None = None
        self.first_ready = asyncio.Event()

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever(), name="worker-health")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self._http.aclose()

    def workers(self) -> list[WorkerStatus]:
        return list(self._workers.values())

    def info(self) -> p.WorkerInfo | None:
        """What the ready workers serve (they all serve the same model)."""
        return next((w.info for w in self._workers.values() if w.ready), None)

    @asynccontextmanager
    async def stream(self, url: str, request: p.GenerateRequest) -> AsyncIterator[AsyncIterator[p.GenerateChunk]]:
        """Open a generate stream. Leaving the context closes the connection, which makes
        the worker abort the request if it has not finished."""
        try:
            async with self._http.stream("POST", f"{url}/generate", content=p.encode(request),
                                         headers={"content-type": "application/json"}) as resp:
                if resp.status_code != 200:
                    await self._raise_for(url, resp)
                yield self._chunks(resp)
        except httpx.HTTPError as e:
            self._mark_down(url, WorkerState.UNREACHABLE, f"unreachable: {e!r}")
            raise WorkerUnavailable(f"worker {url} failed: {e!r}") from e

    async def _chunks(self, resp: httpx.Response) -> AsyncIterator[p.GenerateChunk]:
        async for line in resp.aiter_lines():
            if line:
                yield p.decode(line, p.GenerateChunk)
        # A stream must end with a finish_reason or error chunk; the caller checks that.

    async def _raise_for(self, url: str, resp: httpx.Response) -> None:
        body = await resp.aread()
        error = _decode_or_none(body, p.WorkerError)
        if resp.status_code == 400 and error is not None:
            raise WorkerRejected(error.message, error.param)
        if resp.status_code == 502 and error is not None and error.code == "kv_transfer":
            raise KVTransferFailed(error.message)
        if resp.status_code == 503 and error is not None and error.code == "capacity":
            # A full worker is healthy: it stays routable for smaller or later requests.
            raise WorkerUnavailable(f"worker {url} is full: {error.message}")
        health = _decode_or_none(body, p.WorkerHealth)
        if health is not None and health.status in ("loading", "failed"):
            self._mark_down(url, WorkerState(health.status), health.reason or health.status)
        else:
            reason = error.message if error is not None else body.decode(errors="replace")
            self._mark_down(url, WorkerState.UNREACHABLE, f"HTTP {resp.status_code}: {reason}")
        raise WorkerUnavailable(f"worker {url} answered {resp.status_code}: "
                                f"{self._workers[url].reason}")

    def _mark_down(self, url: str, state: WorkerState, reason: str) -> None:
        worker = self._workers[url]
        if worker.ready:
            logger.warning("worker %s is no longer usable: %s", url, reason)
        worker.set_down(state, reason)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(w) for w in self._workers.values()))
            await asyncio.sleep(self._poll_interval_s)

    async def _poll(self, worker: WorkerStatus) -> None:
        try:
            resp = await self._http.get(f"{worker.url}/health", timeout=5.0)
            if resp.status_code != 200:
                health = p.decode(resp.content, p.WorkerHealth)
                state = WorkerState.LOADING if health.status == "loading" else WorkerState.FAILED
                self._mark_down(worker.url, state, health.reason or health.status)
                return
            if worker.ready:
                worker.set_ready(worker.info)
                return
            # (Re)read /info on every return to ready: a restarted worker may be another one.
            info = p.decode((await self._http.get(f"{worker.url}/info", timeout=5.0)).content,
                            p.WorkerInfo)
            worker.set_ready(info)
            logger.info("worker %s ready: role %s, id %s, model %s, max_model_len %d%s", worker.url,
                        info.role, worker.worker_id, info.model_name, info.max_model_len,
                        f", KV at {worker.kv_endpoint}" if worker.kv_endpoint else "")
            self.first_ready.set()
        except (httpx.HTTPError, msgspec.MsgspecError) as e:
            self._mark_down(worker.url, WorkerState.UNREACHABLE, f"unreachable: {e!r}")


def _decode_or_none(body: bytes, cls: type[msgspec.Struct]):
    try:
        return p.decode(body, cls)
    except msgspec.MsgspecError:
        return None
