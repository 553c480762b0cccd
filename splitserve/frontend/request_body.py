"""Reading and parsing an API request body: bounded in size, never blocking the event loop.

The body is read with a limit (Content-Length is checked before a byte is read, the
stream is stopped as soon as it passes the limit): 413 above it. It is parsed and
validated in one pass by pydantic's own JSON parser, which refuses what Python's json
module would let through to the tokenizer: lone UTF-16 surrogates ("\\ud800"), NaN and
Infinity literals, and nesting deeper than a couple hundred levels (a bounded recursion,
never a RecursionError). A big body is parsed on a thread, so that /live and every other
request keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from splitserve.frontend.errors import bad_request, too_large

# Above this, parsing and validating takes milliseconds: done on a thread.
OFFLOAD_BYTES = 64 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or a 413 OpenAIError as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int):
    return too_large(f"the request body is larger than this server's limit of {limit} bytes "
                     "(--max-request-bytes)")


async def parse_body(data: bytes, model_cls: type[BaseModel]) -> BaseModel:
    if len(data) > OFFLOAD_BYTES:
        return await asyncio.to_thread(_parse, data, model_cls)
    return _parse(data, model_cls)


def _parse(data: bytes, model_cls: type[BaseModel]) -> BaseModel:
    """The validated request, or a 400 OpenAIError naming the offending parameter."""
    try:
        return model_cls.model_validate_json(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON: {err['ctx']['error']}") from None
        if not err["loc"]:
            raise bad_request("the request body must be a JSON object") from None
        param = ".".join(str(x) for x in err["loc"])
        raise bad_request(f"invalid value for '{param}': {err['msg']}", param) from None
