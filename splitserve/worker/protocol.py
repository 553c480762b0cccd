"""Messages between the frontend and a worker's internal HTTP API.

This is a process boundary (and later a network one), so every message is a msgspec
Struct with an explicit JSON codec: no pickle, unknown fields rejected, types checked on
decode. /generate streams one encoded GenerateChunk per line (NDJSON).
"""

from __future__ import annotations

import msgspec

from splitserve.engine.types import TokenLogprobs
from splitserve.sampling_params import SamplingParams

# prefill: computes prompts and serves their KV on its KV port; decode: takes requests
# from the frontend, fetches the prompt's KV from the named prefill worker, decodes;
# both: aggregated, one engine does everything.
ROLES = ("prefill", "decode", "both")
FALLBACKS = ("local", "fail")


class PrefillTarget(msgspec.Struct, forbid_unknown_fields=True):
    """The prefill worker a decode worker fetches the prompt's KV from."""

    worker_id: str
    kv_host: str
    kv_port: int


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """prefill=None: compute the prompt here (aggregated). Otherwise the receiving worker
    (role decode) reserves blocks, fetches the prompt's KV from that prefill worker, and
    decodes; the HTTP status is only sent once the KV is in place (or fell back)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefill: PrefillTarget | None = None


class GenerateChunk(msgspec.Struct, omit_defaults=True):
    """New tokens for one request. The last chunk has finish_reason set; its usage counts
    are totals. `error` ends the stream when the engine failed the request."""

    new_token_ids: list[int] = []
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_transferred_tokens: int = 0     # prompt tokens whose KV came from a prefill worker
    error: str | None = None
    # One per new token when the request asked for logprobs (the engine's own type).
    logprobs: list[TokenLogprobs] | None = None


class WorkerError(msgspec.Struct, omit_defaults=True):
    """Body of a non-200 reply: what went wrong and which request field caused it.
    400: the request is invalid. 503 (code 'capacity'): this decode worker cannot hold the
    prompt now — try another. 502 (code 'kv_transfer'): the KV transfer failed and the
    fallback policy is 'fail'."""

    message: str
    param: str | None = None
    code: str | None = None


class WorkerInfo(msgspec.Struct, omit_defaults=True):
    """What a frontend needs to serve a worker's model and route to it (GET /info).
    kv_host/kv_port: where a prefill worker serves KV (None for other roles)."""

    role: str
    model_name: str
    model_dir: str
    max_model_len: int
    block_size: int
    eos_token_ids: list[int]
    worker_id: str = ""
    kv_host: str | None = None
    kv_port: int | None = None


class WorkerHealth(msgspec.Struct, omit_defaults=True):
    """GET /health body: status is 'ok', 'loading' or 'failed'; reason says why not ok."""

    status: str
    reason: str | None = None


_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def encode_line(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg) + b"\n"


def decode(data: bytes | str, cls: type[msgspec.Struct]):
    """Decode `data` as `cls`; raises msgspec.ValidationError / DecodeError on bad input."""
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.json.Decoder(cls)
    return dec.decode(data)
