"""The frontend's connection to its workers.

Follows discovery (a watch: workers appear, change load, disappear), polls each known
worker's /health and /info into one WorkerStatus, and opens token streams. A worker whose
record disappears (deregistered, or its lease/heartbeat lapsed) is dropped at once: no
request is routed to it after the watch reports it. A worker's reply to /generate is
sorted into what the caller can do about it: try another worker (WorkerUnavailable),
tell the client its request is invalid (WorkerRejected), tell the client the KV
transfer failed (KVTransferFailed), or, once tokens flowed, move the request elsewhere
(WorkerLost). Nothing here knows about OpenAI or about routing: it speaks
worker.protocol and discovery records only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from splitserve.worker.auth import bearer
import msgspec

from splitserve.discovery.base import Discovery
from splitserve.discovery.record import WorkerRecord
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


class WorkerLost(Exception):
    """The worker's stream broke after the request started (the connection dropped, or it
    ended without a finish reason): the worker is gone or failed mid-request."""


_WATCH_RETRY_S = (0.2, 5.0)


class WorkerClient:
    """`on_change` is called (synchronously, on the event loop) after every change to the
    worker set or to a worker's state, with the current workers."""

    def __init__(self, discovery: Discovery, poll_interval_s: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None,
                 on_change: Callable[[list[WorkerStatus]], None] | None = None,
                 secret: str | None = None):
        self._discovery = discovery
        self._workers: dict[str, WorkerStatus] = {}     # discovery worker_id -> status
        self._poll_interval_s = poll_interval_s
        self._on_change = on_change
        # No read timeout: a long prefill legitimately sends nothing for minutes. Every
        # call (generate, info, KV events) carries the deployment's secret, if any.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None), transport=transport, headers=bearer(secret),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._tasks: set[asyncio.Task] = set()
        self.first_ready = asyncio.Event()

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    async def start(self) -> None:
        self._spawn(self._poll_forever(), "worker-health")
        self._spawn(self._follow_discovery(), "worker-discovery")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._discovery.close()
        await self._http.aclose()

    def workers(self) -> list[WorkerStatus]:
        return list(self._workers.values())

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.workers())

    async def _follow_discovery(self) -> None:
        retry_s = _WATCH_RETRY_S[0]
        while True:
            try:
                async for event in self._discovery.watch():
                    retry_s = _WATCH_RETRY_S[0]
                    if event.kind == "put":
                        self._put(event.record)
                    else:
                        self._delete(event.worker_id)
                    self._changed()
                return      # the discovery was closed
            except Exception as e:  # noqa: BLE001 — any backend failure: keep following
                logger.warning("discovery watch failed (%r); retrying in %.1fs", e, retry_s)
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, _WATCH_RETRY_S[1])

    def _put(self, record: WorkerRecord) -> None:
        url = record.api_url.rstrip("/")
        known = self._workers.get(record.worker_id)
        if known is not None and known.url == url:
            known.record = record
            return
        # New, or the same id at a new address (a restart): a fresh status, polled now so
        # that it becomes routable without waiting for the next round.
        status = self._workers[record.worker_id] = WorkerStatus(url, record=record)
        logger.info("worker %s (%s) registered at %s", record.worker_id, record.role, url)
        self._spawn(self._poll(status), f"worker-poll-{record.worker_id}")

    def _delete(self, worker_id: str) -> None:
        status = self._workers.pop(worker_id, None)
        if status is not None:
            logger.warning("worker %s at %s left discovery (deregistered or its registration "
                           "lapsed); no longer routed", worker_id, status.url)

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
        url = str(resp.request.url).rsplit("/generate", 1)[0]
        try:
            async for line in resp.aiter_lines():
                if line:
                    yield p.decode(line, p.GenerateChunk)
        except httpx.HTTPError as e:
            self._mark_down(url, WorkerState.UNREACHABLE, f"stream broken: {e!r}")
            raise WorkerLost(f"worker {url} broke the stream: {e!r}") from e
        # A stream must end with a finish_reason or error chunk; the caller checks that.

    async def _raise_for(self, url: str, resp: httpx.Response) -> None:
        body = await resp.aread()
        error = _decode_or_none(body, p.WorkerError)
        if resp.status_code == 400 and error is not None and error.code == "unknown_prefill_worker":
            # Not the request's fault: this decode worker has not seen the prefill worker
            # in its discovery yet (or never will). Another attempt or a later retry can work.
            raise WorkerUnavailable(f"worker {url} does not know the prefill worker: {error.message}")
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
        raise WorkerUnavailable(f"worker {url} answered {resp.status_code}: {self._reason(url)}")

    def _find(self, url: str) -> WorkerStatus | None:
        return next((w for w in self._workers.values() if w.url == url), None)

    def _reason(self, url: str) -> str | None:
        worker = self._find(url)
        return None if worker is None else worker.reason

    def _mark_down(self, url: str, state: WorkerState, reason: str) -> None:
        worker = self._find(url)
        if worker is None:      # it left discovery meanwhile
            return
        if worker.ready:
            logger.warning("worker %s is no longer usable: %s", url, reason)
            worker.set_down(state, reason)
            self._changed()
        else:
            worker.set_down(state, reason)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(w) for w in self.workers()))
            await asyncio.sleep(self._poll_interval_s)

    async def _poll(self, worker: WorkerStatus) -> None:
        try:
            resp = await self._http.get(f"{worker.url}/health", timeout=5.0)
            if resp.status_code != 200:
                health = p.decode(resp.content, p.WorkerHealth)
                state = WorkerState.LOADING if health.status == "loading" else WorkerState.FAILED
                self._mark_down(worker.url, state, health.reason or health.status)
                return
            if worker.state is WorkerState.READY:
                worker.set_ready(worker.info)
                return
            # (Re)read /info on every return to ready: a restarted worker may be another one.
            info = p.decode((await self._http.get(f"{worker.url}/info", timeout=5.0)).content,
                            p.WorkerInfo)
            worker.set_ready(info)
            self._changed()
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
