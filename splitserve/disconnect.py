"""Await work on behalf of an HTTP caller, unless the caller disconnects first; stream a
response whose generator is closed the moment the caller leaves.

Shared by the frontend (a request waiting in the admission queue) and the decode worker
(a request waiting for its KV): a caller that left must not keep a queue place, a KV
reservation or a prefill alive. NOTE: call it only once the request body was read:
after that, the server's receive() yields nothing but the disconnect, and the watcher is
gone before any response streams (a streaming response reads the same channel).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


async def _disconnected(request: Request) -> None:
    message = await request.receive()
    while message["type"] != "http.disconnect":
        message = await request.receive()


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """(True, work's result), or (False, None) when the caller disconnected first and the
    work was cancelled. Work's exceptions propagate; so does our own cancellation, which
    cancels the work too."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait([gone] if task.done() else [task, gone])
    if task.cancelled():
        return False, None
    return True, task.result()


async def cancel_and_wait(tasks: list[asyncio.Future]) -> None:
    """Cancel `tasks` and wait until each has run its cleanup. Shielded: when the client
    leaves, the server cancels the caller's scope and anyio re-cancels every await in it;
    a cancelled gather would cancel the tasks a second time, in the middle of their
    cleanup (the HTTP client's closing of a worker connection among it: left open, the
    worker generates to max_tokens for nobody)."""
    for t in tasks:
        t.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.gather(*tasks, return_exceptions=True)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its async generator when the response ends, however
    it ends. Starlette cancels the sending task when the caller disconnects; if that lands
    in send() rather than inside the generator, the generator stays suspended at a yield
    and its `finally` (abort the request, free its KV blocks, close the upstream stream)
    waits for the garbage collector, which the traceback's reference cycles delay for
    seconds or more: meanwhile the engine generates for nobody. Shielded, because anyio
    cancellation recurs at every await inside the cancelled scope.

    on_close() runs last, always: a generator the caller left before its first item
    never ran, so no `finally` of its own can clean up after it."""

    def __init__(self, content, *args, on_close: Callable[[], None] | None = None, **kwargs):
        super().__init__(content, *args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()
            finally:
                if self._on_close is not None:
                    self._on_close()
