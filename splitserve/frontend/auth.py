"""The frontend's API key (`--api-key` / $SPLITSERVE_API_KEY): every route but the probes
and metrics needs `Authorization: Bearer <key>` (the /v1 API, /tokenize, /detokenize, and
/cluster, which names the workers' internal addresses); anything else is a 401 in OpenAI's
error shape, which the `openai` SDK raises as AuthenticationError.

/live, /health and /metrics stay open, as Kubernetes probes and Prometheus scrapers
expect (splitserve.bearer_auth, shared with the worker API).
"""

from __future__ import annotations

import logging
from typing import Callable

from splitserve.bearer_auth import BearerAuth
from splitserve.frontend.errors import OpenAIError

logger = logging.getLogger(__name__)

API_KEY_ENV = "SPLITSERVE_API_KEY"


def unauthorized() -> OpenAIError:
    # Says what is needed, never what was expected or received.
    return OpenAIError(401, "Invalid or missing API key: send Authorization: Bearer <key>")


class ApiKeyAuth(BearerAuth):
    """Sits inside the request-id middleware: a refusal carries `x-request-id` and its log
    line the request's id."""

    def __init__(self, app, api_key: str | None, on_refused: Callable[[], None] = lambda: None):
        super().__init__(app, api_key, on_refused)

    async def refuse(self, scope, receive, send, given: bytes) -> None:
        logger.info("request_id=%s %s %s refused: %s API key", scope.get("state", {}).get(
            "request_id"), scope["method"], scope["path"], "wrong" if given else "no")
        response = unauthorized().response()
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
