"""Per-request block tables on top of the BlockPool, with prefix-cache lookups.

Invariant: a request's block table covers at least its num_computed_tokens; its first
`len(table)` blocks are referenced once by the request; blocks are only ever appended
while the request lives and all are released together.
"""

from __future__ import annotations

from splitserve.kvtypes.block_hash import extend_block_hashes
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.tables: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # table prefix already registered
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens. At least one
        token is always left to compute: the model must run to produce the next logits."""
        if not self.enable_caching:
            return []
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = []
        for h in req.block_hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Counted once per admission, not per lookup: a request that waits for blocks is
        looked up again each step."""
        self.prefix_queries_tokens += num_query_tokens
        self.prefix_hits_tokens += num_hit_tokens

    def can_allocate(self, req: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        return self._num_to_allocate(req, num_new_tokens, cached) is not None

    def _num_to_allocate(self, req: Request, num_new_tokens: int, cached) -> int | None:
        table = self.tables.get(req.request_id, [])
        total = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(table) - len(cached)
        # Cached blocks with no other user sit in the free queue; reviving them uses it up.
        revived = sum(1 for b in cached if self.pool.is_free(b))
        if max(need, 0) + revived > self.pool.num_free_blocks:
            return None
        return max(need, 0)

    def allocate(self, req: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Make the table cover computed + len(cached)*block_size + num_new_tokens tokens.
        Returns False (and changes nothing) when the pool cannot provide the blocks."""
        need = self._num_to_allocate(req, num_new_tokens, cached)
        if need is None:
            return False
        table = self.tables.setdefault(req.request_id, [])
        if cached:
            self.pool.touch(list(cached))
            table.extend(cached)
            self._num_cached_blocks[req.request_id] = len(table)
        table.extend(self.pool.allocate(need))
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Register every full block whose tokens are all computed."""
        if not self.enable_caching:
            return
        table = self.tables.get(req.request_id)
        if not table:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(table))
        start = self._num_cached_blocks.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size)
        self.pool.cache(table[start:num_full], hashes[start:num_full], hashes[start - 1] if start else None)
        self._num_cached_blocks[req.request_id] = num_full

    def free(self, req: Request) -> None:
        table = self.tables.pop(req.request_id, [])
        self._num_cached_blocks.pop(req.request_id, None)
        self.pool.free(reversed(table))

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks
