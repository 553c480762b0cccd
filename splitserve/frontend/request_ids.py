"""Request ids: taken from the client's `x-request-id` or generated, returned in every
response's `x-request-id` header, and used as the id of the request on the workers, so
that one grep over the frontend's, the decode worker's and the prefill worker's logs
follows a request end to end.

A pure ASGI middleware (not BaseHTTPMiddleware), so streamed responses pass through
untouched. The id lands in `request.state.request_id`.
"""

from __future__ import annotations

import re
import uuid

from splitserve.frontend.errors import bad_request

HEADER = "x-request-id"
# Ids end up in log lines and worker request ids: printable, no spaces, bounded, so a
# client cannot forge or split log lines with one.
_VALID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class RequestIdMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER.encode()), None)
        if given is not None and not _VALID.fullmatch(given):
            error = bad_request(f"invalid {HEADER} header: expected 1 to 128 characters from "
                                "letters, digits and ._:@/+=-", HEADER)
            return await error.response()(scope, receive, send)
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (HEADER.encode(), request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
