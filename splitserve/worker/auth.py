"""The worker API's authentication: with a deployment secret (`--kv-secret` /
$SPLITSERVE_KV_SECRET) every route but the probes and metrics needs
`Authorization: Bearer <secret>`.

The same secret authenticates KV sessions, so one setting protects both ways into a
worker: nobody who lacks it can make a decode worker generate (and so fetch KV) or read a
worker's KV cache events. /live, /health and /metrics stay open, as Kubernetes probes and
Prometheus scrapers expect. A pure ASGI middleware, so streamed responses pass through.
"""

from __future__ import annotations

import hmac
from typing import Callable

import msgspec

OPEN_PATHS = frozenset({"/live", "/health", "/metrics"})


def bearer(secret: str | None) -> dict[str, str]:
    """Headers a client of the worker API sends (none without a secret)."""
    return {} if secret is None else {"authorization": f"Bearer {secret}"}


class WorkerAuth:
    def __init__(self, app, secret: str | None, on_refused: Callable[[], None] = lambda: None):
        self.app = app
        self._expected = None if secret is None else f"Bearer {secret}".encode()
        self._on_refused = on_refused

    async def __call__(self, scope, receive, send):
        if (self._expected is None or scope["type"] != "http"
                or scope["path"] in OPEN_PATHS):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        self._on_refused()
        # Says what is needed, never what was expected or received.
        body = msgspec.json.encode({"message": "this worker requires the deployment's secret: "
                                               "send Authorization: Bearer <secret>",
                                    "code": "unauthorized"})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
