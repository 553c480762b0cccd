"""Run an ASGI app with uvicorn on a socket we bind ourselves.

Binding first lets `--port 0` pick a free port and lets a supervisor learn it through
`--port-file` (written only once the socket listens, so a reader can connect at once).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a graceful shutdown starts: a response that
    never ends by itself (an event stream) would otherwise hold the shutdown until
    timeout_graceful_shutdown, and discovery would keep listing a worker that is leaving."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], Awaitable[None]] | None):
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        if self._on_shutdown is not None:
            await self._on_shutdown()
        await super().shutdown(sockets)


class HttpServer:
    def __init__(self, app, host: str, port: int,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        # log_config=None: keep the process's own logging setup (one format everywhere).
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self._server = _Server(config, on_shutdown)

    def request_exit(self) -> None:
        """Ask the server to shut down gracefully (safe to call from the event loop)."""
        self._server.should_exit = True

    def run(self, port_file: str | None = None) -> None:
        self._sock.listen(2048)
        if port_file:
            tmp = Path(f"{port_file}.tmp")
            tmp.write_text(str(self.port))
            os.replace(tmp, port_file)  # atomic: a reader never sees a partial number
        asyncio.run(self._server.serve(sockets=[self._sock]))
