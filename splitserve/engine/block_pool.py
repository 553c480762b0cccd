"""The pool of KV blocks: ref counts, a free queue in LRU order, and the prefix-cache map.

Only integer block ids live here; the KV tensor itself belongs to the model runner.
A block with ref_cnt 0 sits in the free queue; if it also has a hash it is a cached block
that can be revived by a prefix hit until it is reallocated (LRU eviction).

Every change to the prefix-cache map is also recorded as a KV cache event (stored,
removed, all cleared), for routers that mirror which prefixes this engine holds.
NOTE: the events, replayed in order, give exactly the key set of `_cached`: the hashes a
prefix lookup can hit. They are recorded at the mutation itself, nowhere else.
"""

from __future__ import annotations

from collections import OrderedDict

from splitserve.kvtypes.events import AllCleared, BlockRemoved, BlockStored, KVEvent


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
        # hash -> the hash of the block before it in its sequence (None for a first block),
        # kept only while the hash is cached: lets snapshot() list blocks in chain order.
        self._parent: dict[int, int | None] = {}
        self._events: list[KVEvent] = []

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
        evicted = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                # Evicting a cached block: its content is about to be overwritten.
                # NOTE: block_hash is set only on the canonical block of a hash (cache()).
                del self._cached[h]
                del self._parent[h]
                evicted.append(h)
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        if evicted:
            self._events.append(BlockRemoved(evicted))
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

    def cache(self, block_ids: list[int], block_hashes: list[int], parent_hash: int | None) -> None:
        """Register a run of consecutive full, computed blocks of one sequence under their
        chained hashes; parent_hash is the hash of the block before the run (None at the
        start of a sequence). If another block already holds the same content the first
        one stays canonical, and no event is recorded for the duplicate."""
        if not self.enable_caching:
            return
        run: list[int] = []
        run_parent = parent_hash
        parent = parent_hash
        for b, h in zip(block_ids, block_hashes):
            if self.block_hash[b] is None and h not in self._cached:
                self.block_hash[b] = h
                self._cached[h] = b
                self._parent[h] = parent
                run.append(h)
            elif run:
                # A gap: the next stored run continues from a block stored earlier.
                self._events.append(BlockStored(run, run_parent))
                run = []
            if not run:
                run_parent = h
            parent = h
        if run:
            self._events.append(BlockStored(run, run_parent))

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of unreferenced blocks; returns how many were dropped.
        Blocks still referenced keep their hashes (their requests may extend them)."""
        dropped = []
        for h, b in list(self._cached.items()):
            if self.ref_cnt[b] == 0:
                del self._cached[h]
                del self._parent[h]
                self.block_hash[b] = None
                dropped.append(h)
        if not self._cached:
            self._events.append(AllCleared())
        elif dropped:
            self._events.append(BlockRemoved(dropped))
        return len(dropped)

    def drain_events(self) -> list[KVEvent]:
        """The events recorded since the last drain, oldest first."""
        events, self._events = self._events, []
        return events

    def snapshot(self) -> list[KVEvent]:
        """Events that rebuild the current prefix cache from nothing: AllCleared, then the
        cached blocks as BlockStored runs in chain order (a parent before its children)."""
        events: list[KVEvent] = [AllCleared()]
        emitted: set[int] = set()
        for start in self._cached:
            # Insertion order is chain order except where an evicted parent was cached
            # again after its child: walk up to the first ancestor not yet emitted.
            chain = []
            h = start
            while h in self._cached and h not in emitted:
                chain.append(h)
                h = self._parent[h]
            for h in reversed(chain):
                emitted.add(h)
                parent = self._parent[h]
                last = events[-1]
                if isinstance(last, BlockStored) and last.block_hashes[-1] == parent:
                    last.block_hashes.append(h)
                else:
                    events.append(BlockStored([h], parent))
        return events
