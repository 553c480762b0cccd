"""Request ids: the client's `x-request-id` (or a generated one) is returned in every
response's `x-request-id` header. Internally (logs, the workers' request ids) a request is
`<client id>-<8 hex digits>`: unique even when clients reuse an id (two concurrent
requests under one id must not collide on a worker), and still found, in the frontend's,
the decode worker's and the prefill worker's logs alike, by a grep for the client's id.
Without a client id the internal and returned ids are the same generated one.

A pure ASGI middleware (not BaseHTTPMiddleware), so streamed responses pass through
untouched. The internal id lands in `request.state.request_id`.
"""

from __future__ import annotations

import re
import secrets
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
        returned = given or uuid.uuid4().hex
        request_id = returned if given is None else f"{given}-{secrets.token_hex(4)}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (HEADER.encode(), returned.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
