"""A deterministic stand-in for a prefill engine, for tests and `bench transfer`.

Block contents depend only on (request_id, logical block), so D can check every byte it
received against `expected_block` without talking to P.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

import numpy as np
import torch
import xxhash

from splitserve.transfer.backend import (BlocksReady, Done, Event, PrefillBackend,
                                         PrefillRequest, Progress)
from splitserve.transfer.kvmem import KVBlocks


def expected_block(request_id: str, logical_block: int, nbytes: int) -> np.ndarray:
    seed = xxhash.xxh64_intdigest(f"{request_id}/{logical_block}".encode())
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def expected_first_token(request_id: str) -> int:
    return xxhash.xxh32_intdigest(request_id.encode()) % 32000


class SyntheticBackend(PrefillBackend):
    """Serves requests from `kv` with fake compute.

    blocks_per_chunk / chunk_delay: a "chunk" of compute takes chunk_delay seconds and
        finishes that many blocks.
    progress_interval: during a chunk, report Progress this often (None: once per chunk).
    stall_at_block: reaching this logical block, go silent until released (a hung P).
    fail_at_block: reaching this logical block, raise (a crashed prefill).
    block_map: logical -> physical id without allocation or filling (the benchmark streams
        more blocks than fit by reusing a pool); default allocates free blocks in a
        scrambled order, so physical ids differ from logical ones and from D's.
    """

    def __init__(self, kv: torch.Tensor, *, blocks_per_chunk: int = 4, chunk_delay: float = 0.0,
                 progress_interval: float | None = None, stall_at_block: int | None = None,
                 fail_at_block: int | None = None,
                 block_map: Callable[[int], int] | None = None):
        self.blocks = KVBlocks(kv)
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_delay = chunk_delay
        self.progress_interval = progress_interval
        self.stall_at_block = stall_at_block
        self.fail_at_block = fail_at_block
        self.block_map = block_map
        self._lock = threading.Lock()
        self._free = list(reversed(range(self.blocks.num_blocks)))
        self.pinned: dict[str, list[int]] = {}
        self.released: list[str] = []
        self.started: list[str] = []
        self._released_evt: dict[str, threading.Event] = {}

    def _allocate(self, request: PrefillRequest) -> list[int]:
        n = request.num_blocks
        if self.block_map is not None:
            return [self.block_map(i) for i in range(n)]
        with self._lock:
            if n > len(self._free):
                raise RuntimeError(f"request {request.request_id}: {n} blocks needed, "
                                   f"{len(self._free)} free")
            ids = [self._free.pop() for _ in range(n)]
            # every other block swapped: runs of adjacent ids exist but are short
            for i in range(0, n - 1, 2):
                ids[i], ids[i + 1] = ids[i + 1], ids[i]
            self.pinned[request.request_id] = ids
        nb = self.blocks.block_nbytes
        for i, b in enumerate(ids):
            self.blocks.mem[b * nb:(b + 1) * nb] = expected_block(request.request_id, i, nb)
        return ids

    def start(self, request: PrefillRequest) -> Iterator[Event]:
        rid, n = request.request_id, request.num_blocks
        released = threading.Event()
        with self._lock:
            self.started.append(rid)
            self._released_evt[rid] = released
        ids = self._allocate(request)
        tokens = len(request.token_ids)
        step = max(1, self.blocks_per_chunk)
        for first in range(0, n, step):
            last = min(n, first + step)
            if self.stall_at_block is not None and self.stall_at_block < last:
                released.wait()
                return
            if self.fail_at_block is not None and self.fail_at_block < last:
                raise RuntimeError(f"synthetic prefill failure at block {self.fail_at_block}")
            yield from self._compute(released, min(tokens, first * self.blocks.block_size), tokens)
            done_tokens = min(tokens, last * self.blocks.block_size)
            if released.is_set():
                return
            yield BlocksReady(first, ids[first:last])
            yield Progress(done_tokens, tokens)
        yield Done(expected_first_token(rid))

    def _compute(self, released: threading.Event, done_tokens: int,
                 tokens: int) -> Iterator[Event]:
        if self.chunk_delay <= 0:
            return
        if self.progress_interval is None:
            released.wait(self.chunk_delay)
            return
        end = time.monotonic() + self.chunk_delay
        while (left := end - time.monotonic()) > 0 and not released.is_set():
            released.wait(min(left, self.progress_interval))
            yield Progress(done_tokens, tokens)

    def release(self, request_id: str) -> None:
        with self._lock:
            self.released.append(request_id)
            evt = self._released_evt.get(request_id)
            ids = self.pinned.pop(request_id, [])
            self._free.extend(ids)
        if evt is not None:
            evt.set()


def make_kv(num_blocks: int, *, num_layers: int = 2, block_size: int = 16, num_kv_heads: int = 2,
            head_dim: int = 32, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A zeroed KV tensor in the engine's layout (8 KiB blocks with the defaults)."""
    return torch.zeros(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype)


def mismatched_blocks(kv: torch.Tensor, request_id: str, dest_blocks: list[int],
                      count: int) -> list[int]:
    """Logical blocks among the first `count` whose bytes in kv differ from what P sent."""
    blocks = KVBlocks(kv)
    nb = blocks.block_nbytes
    return [i for i, b in enumerate(dest_blocks[:count])
            if bytes(blocks.mem[b * nb:(b + 1) * nb]) != expected_block(request_id, i, nb).tobytes()]
