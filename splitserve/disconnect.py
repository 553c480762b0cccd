"""Await work on behalf of an HTTP caller, unless the caller disconnects first.

Shared by the frontend (a request waiting in the admission queue) and the decode worker
(a request waiting for its KV): a caller that left must not keep a queue place, a KV
reservation or a prefill alive. NOTE: call it only once the request body was read:
after that, the server's receive() yields nothing but the disconnect, and the watcher is
gone before any response streams (a streaming response reads the same channel).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from starlette.requests import Request


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
        gone.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()
