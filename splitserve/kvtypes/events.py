"""KV cache events: what a worker tells routers about the blocks in its prefix cache.

Blocks are named by the engine's chained block hashes (kvtypes/block_hash.py): a hash
covers its block's tokens and every token before it, so one hash names a whole prefix
and is the same on every worker and in every router. Events cross a process boundary,
so they are msgspec Structs with an explicit codec (a tagged union, JSON).
"""

from __future__ import annotations

from typing import Union

import msgspec


class BlockStored(msgspec.Struct, tag="stored", frozen=True):
    """Blocks entered the worker's prefix cache, in prompt order. parent_hash is the hash
    of the block before block_hashes[0] (None at the start of a sequence); the index does
    not need it (a chained hash already names its prefix), it lets a consumer check that
    a run of blocks continues one it knows."""

    block_hashes: list[int]
    parent_hash: int | None = None


class BlockRemoved(msgspec.Struct, tag="removed", frozen=True):
    """Blocks left the worker's prefix cache (evicted for reuse)."""

    block_hashes: list[int]


class AllCleared(msgspec.Struct, tag="cleared", frozen=True):
    """The worker's prefix cache is empty (a reset, or a fresh start)."""


KVEvent = Union[BlockStored, BlockRemoved, AllCleared]


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events from one worker, in the order they happened.

    epoch names one run of the worker process (e.g. its start time in ns) and seq counts
    its batches from 0. Together they let a router notice a restarted worker (new epoch:
    its cache is new) and lost batches (a gap in seq: its view of that worker is wrong),
    instead of routing on a picture that silently drifted from the worker's cache.
    """

    worker_id: str
    epoch: int
    seq: int
    events: list[KVEvent]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(data: bytes | str) -> KVEventBatch:
    """Raises msgspec.ValidationError / msgspec.DecodeError on a malformed batch."""
    return _decoder.decode(data)
