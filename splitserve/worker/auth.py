"""The worker API's authentication: with a deployment secret (`--kv-secret` /
$SPLITSERVE_KV_SECRET) every route but the probes and metrics needs
`Authorization: Bearer <secret>`.

The same secret authenticates KV sessions, so one setting protects both ways into a
worker: nobody who lacks it can make a decode worker generate (and so fetch KV) or read a
worker's KV cache events. /live, /health and /metrics stay open, as Kubernetes probes and
Prometheus scrapers expect (splitserve.bearer_auth, shared with the frontend's API key).
"""

from __future__ import annotations

from typing import Callable

import msgspec

from splitserve.bearer_auth import BearerAuth


def bearer(secret: str | None) -> dict[str, str]:
    """Headers a client of the worker API sends (none without a secret)."""
    return {} if secret is None else {"authorization": f"Bearer {secret}"}


class WorkerAuth(BearerAuth):
    def __init__(self, app, secret: str | None, on_refused: Callable[[], None] = lambda: None):
        super().__init__(app, secret, on_refused)

    async def refuse(self, scope, receive, send, given: bytes) -> None:
        # Says what is needed, never what was expected or received.
        body = msgspec.json.encode({"message": "this worker requires the deployment's secret: "
                                               "send Authorization: Bearer <secret>",
                                    "code": "unauthorized"})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
