"""Messages between the frontend and a worker's internal HTTP API.

This is a process boundary (and later a network one), so every message is a msgspec
Struct with an explicit JSON codec: no pickle, unknown fields rejected, types checked on
decode. /generate streams one encoded GenerateChunk per line (NDJSON).
"""

from __future__ import annotations

import msgspec

from splitserve.engine.types import SamplingParams

# prefill and decode roles arrive with disaggregation; only the aggregated role exists now.
ROLES = ("both",)


class Sampling(msgspec.Struct, forbid_unknown_fields=True):
    """Wire form of engine.types.SamplingParams (validated again when converted)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    def to_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos)


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling


class GenerateChunk(msgspec.Struct, omit_defaults=True):
    """New tokens for one request. The last chunk has finish_reason set; its usage counts
    are totals. `error` ends the stream when the engine failed the request."""

    new_token_ids: list[int] = []
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


class WorkerError(msgspec.Struct):
    """Body of a non-200 reply: what went wrong and which request field caused it."""

    message: str
    param: str | None = None


class WorkerInfo(msgspec.Struct):
    """What a frontend needs to serve a worker's model (GET /info)."""

    role: str
    model_name: str
    model_dir: str
    max_model_len: int
    block_size: int
    eos_token_ids: list[int]


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
