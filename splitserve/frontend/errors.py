"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}.

`type` follows vLLM's OpenAI server (BadRequestError, NotFoundError, ...) and `code` is
the HTTP status, so clients written against vLLM see the same bodies.
"""

from __future__ import annotations

import msgspec
from fastapi.responses import Response

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          413: "RequestTooLargeError",
          500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}

    def response(self) -> Response:
        return Response(msgspec.json.encode(self.body()), status_code=self.status,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def too_large(message: str) -> OpenAIError:
    return OpenAIError(413, message)


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message)


def bad_gateway(message: str) -> OpenAIError:
    """A worker behind the frontend failed the request in a way retrying cannot fix."""
    return OpenAIError(502, message)
