"""Chained block hashes: a block's hash covers its tokens and, through the parent hash,
every token before it. Equal hashes mean equal prefixes. xxh3 keeps the value identical
across processes and machines, so workers and the router agree on block identity."""

from __future__ import annotations

import struct

import numpy as np
import xxhash

ROOT_HASH = 0x5B1175E4  # parent of a sequence's first block


def hash_block(parent: int, token_ids) -> int:
    data = struct.pack("<Q", parent) + np.asarray(token_ids, dtype=np.int64).tobytes()
    return xxhash.xxh3_64_intdigest(data)


def extend_block_hashes(hashes: list[int], token_ids: list[int], block_size: int) -> list[int]:
    """Append hashes for every full block of token_ids not yet hashed; returns `hashes`."""
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes
