"""The pool of KV blocks: ref counts, a free queue in LRU order, and the prefix-cache map.

Only integer block ids live here; the KV tensor itself belongs to the model runner.
A block with ref_cnt 0 sits in the free queue; if it also has a hash it is a cached block
that can be revived by a prefix hit until it is reallocated (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free (a caller bug:
    callers check num_free_blocks first)."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # NOTE: insertion order is eviction order: the head is the least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}   # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live request."""
        return self.num_blocks - len(self._free)

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on blocks found in the prefix cache (reviving free ones)."""
        for b in block_ids:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                # Evicting a cached block: its content is about to be overwritten.
                if self._cached.get(h) == b:
                    del self._cached[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def free(self, block_ids) -> None:
        """Drop one reference from each block, in the given order: blocks freed first are
        evicted first, so callers pass a request's tail blocks first."""
        for b in block_ids:
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                if self.block_hash[b] is None:
                    # Uncached content is worthless: reuse these before cached blocks.
                    self._free[b] = None
                    self._free.move_to_end(b, last=False)
                else:
                    self._free[b] = None

    def cache(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed block under its chained hash. If another block already
        holds the same content the first one stays canonical."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self._cached:
            return
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of unreferenced blocks; returns how many were dropped."""
        dropped = 0
        for h, b in list(self._cached.items()):
            if self.ref_cnt[b] == 0:
                del self._cached[h]
                self.block_hash[b] = None
                dropped += 1
        return dropped
