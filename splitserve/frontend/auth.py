"""The frontend's API key (`--api-key` / $SPLITSERVE_API_KEY): every route but the probes
and metrics needs `Authorization: Bearer <key>` (the /v1 API, /tokenize, /detokenize, and
/cluster, which names the workers' internal addresses); anything else is a 401 in OpenAI's
error shape, which the `openai` SDK raises as AuthenticationError.

/live, /health and /metrics stay open, as Kubernetes probes and Prometheus scrapers
expect. The key is compared in constant time and never logged, nor echoed in a response.
A pure ASGI middleware, so streamed responses pass through.
"""

from __future__ import annotations

import hmac
import logging
from typing import Callable

from splitserve.frontend.errors import OpenAIError

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/live", "/health", "/metrics"})
API_KEY_ENV = "SPLITSERVE_API_KEY"


def unauthorized() -> OpenAIError:
    # Says what is needed, never what was expected or received.
    return OpenAIError(401, "Invalid or missing API key: send Authorization: Bearer <key>")


class ApiKeyAuth:
    """Sits inside the request-id middleware: a refusal carries `x-request-id` and its log
    line the request's id."""

    def __init__(self, app, api_key: str | None, on_refused: Callable[[], None] = lambda: None):
        self.app = app
        self._expected = None if api_key is None else f"Bearer {api_key}".encode()
        self._on_refused = on_refused

    async def __call__(self, scope, receive, send):
        if (self._expected is None or scope["type"] != "http"
                or scope["path"] in OPEN_PATHS):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        self._on_refused()
        logger.info("request_id=%s %s %s refused: %s API key", scope.get("state", {}).get(
            "request_id"), scope["method"], scope["path"], "wrong" if given else "no")
        response = unauthorized().response()
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
