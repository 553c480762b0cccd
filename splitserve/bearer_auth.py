"""`Authorization: Bearer <token>` on every route but the probes and metrics, as a pure
ASGI middleware (streamed responses pass through). The frontend's API key and the
worker API's deployment secret differ only in how they refuse.

/live, /health and /metrics stay open, as Kubernetes probes and Prometheus scrapers
expect. The token is compared in constant time and never logged nor echoed.
"""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from typing import Callable

OPEN_PATHS = frozenset({"/live", "/health", "/metrics"})


class BearerAuth(ABC):
    """Subclasses implement refuse(scope, receive, send, given): the 401 response;
    `given` is the Authorization header received (b"" when there was none)."""

    def __init__(self, app, token: str | None, on_refused: Callable[[], None] = lambda: None):
        self.app = app
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def __call__(self, scope, receive, send):
        if (self._expected is None or scope["type"] != "http"
                or scope["path"] in OPEN_PATHS):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        self._on_refused()
        await self.refuse(scope, receive, send, given)

    @abstractmethod
    async def refuse(self, scope, receive, send, given: bytes) -> None:
        """Send the 401."""
