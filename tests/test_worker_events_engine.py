"""KV cache events from the engine: replaying them must give exactly the set of hashes a
prefix lookup can hit — under caching, duplicates, eviction, preemption and reset."""

import random

from splitserve.kvtypes.block_hash import extend_block_hashes
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.request import Request
from splitserve.engine.types import SamplingParams
from splitserve.kvtypes.events import AllCleared, BlockRemoved, BlockStored

BS = 4


def req(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=4, temperature=0), (), 0)


def replay(events, held: set[int] | None = None) -> set[int]:
    held = set() if held is None else held
    for e in events:
        if isinstance(e, BlockStored):
            assert not held & set(e.block_hashes), "stored twice without a removal between"
            held.update(e.block_hashes)
        elif isinstance(e, BlockRemoved):
            assert set(e.block_hashes) <= held, "removed a block that was never stored"
            held.difference_update(e.block_hashes)
        else:
            assert isinstance(e, AllCleared)
            held.clear()
    return held


def cache_prompt(kv: KVCacheManager, rid: str, tokens: list[int]) -> Request | None:
    """Admit a request through the prefix cache and compute its prompt, like the engine."""
    r = req(rid, tokens)
    cached = kv.find_cached_prefix(r)
    if not kv.allocate(r, len(tokens) - len(cached) * BS, cached):
        return None
    r.num_computed_tokens = len(tokens)
    kv.cache_computed_blocks(r)
    return r


def test_stored_events_carry_chain_and_parent_and_skip_duplicates():
    kv = KVCacheManager(16, BS)
    a = cache_prompt(kv, "a", list(range(10)))           # 2 full blocks
    ha = extend_block_hashes([], list(range(10)), BS)
    assert kv.pool.drain_events() == [BlockStored(ha, None)]
    assert kv.pool.drain_events() == []
    # b shares a's first block through the prefix cache, then adds two of its own.
    b = cache_prompt(kv, "b", list(range(4)) + list(range(50, 62)))
    hb = extend_block_hashes([], list(range(4)) + list(range(50, 62)), BS)
    assert hb[0] == ha[0]
    assert kv.pool.drain_events() == [BlockStored(hb[1:], hb[0])]
    # Same tokens computed without the cache lookup (a duplicate block): no event for it.
    c = req("c", list(range(10)))
    assert kv.allocate(c, 10)
    c.num_computed_tokens = 10
    kv.cache_computed_blocks(c)
    assert kv.pool.drain_events() == []
    for r in (a, b, c):
        kv.free(r)
    assert kv.pool.drain_events() == []      # freeing keeps blocks cached


def test_events_match_lookups_under_random_eviction():
    rng = random.Random(7)
    kv = KVCacheManager(24, BS)
    prefixes = [[rng.randrange(1000) for _ in range(12)] for _ in range(4)]
    held: set[int] = set()
    live: list[Request] = []
    removed = 0
    for i in range(300):
        if live and (rng.random() < 0.5 or len(live) > 3):
            kv.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prefixes)[:rng.choice((4, 8, 12))] + \
                [rng.randrange(1000) for _ in range(rng.randrange(1, 10))]
            r = cache_prompt(kv, f"r{i}", tokens)
            if r is not None:
                live.append(r)
        events = kv.pool.drain_events()
        removed += sum(isinstance(e, BlockRemoved) for e in events)
        replay(events, held)
        # Exactly the hashes a lookup can hit, each resolving to a block that holds it.
        assert held == set(kv.pool._cached)
        assert all(kv.pool.block_hash[kv.pool.lookup(h)] == h for h in held)
        # And a lookup of any cached prefix hits through the mirrored hashes.
        probe = req("probe", rng.choice(prefixes) + [1])
        mirrored = 0
        for h in extend_block_hashes([], probe.all_token_ids, BS):
            if h not in held:
                break
            mirrored += 1
        assert len(kv.find_cached_prefix(probe)) == mirrored
    assert removed > 10, "the workload must evict"


def test_snapshot_rebuilds_the_cache_in_chain_order():
    kv = KVCacheManager(8, BS)
    kv.free(cache_prompt(kv, "a", list(range(12))))            # 3 blocks
    kv.free(cache_prompt(kv, "b", list(range(100, 120))))      # 5 blocks
    kv.pool.drain_events()
    snap = kv.pool.snapshot()
    assert replay(snap) == set(kv.pool._cached)
    assert snap == [AllCleared(), BlockStored(extend_block_hashes([], list(range(12)), BS), None),
                    BlockStored(extend_block_hashes([], list(range(100, 120)), BS), None)]


def test_snapshot_puts_a_recached_parent_before_its_orphaned_child():
    pool = KVCacheManager(2, BS).pool
    blocks = pool.allocate(2)
    pool.cache(blocks, [11, 22], None)
    pool.free([blocks[0]])
    assert pool.allocate(1) == [blocks[0]]        # evicts 11; 22 (a child) stays cached
    pool.cache([blocks[0]], [11], None)           # 11 cached again, after its child
    assert pool.drain_events() == [BlockStored([11, 22], None), BlockRemoved([11]),
                                   BlockStored([11], None)]
    assert pool.snapshot() == [AllCleared(), BlockStored([11, 22], None)]


def test_reset_reports_removed_or_all_cleared():
    kv = KVCacheManager(8, BS)
    a = cache_prompt(kv, "a", list(range(8)))
    b = cache_prompt(kv, "b", list(range(100, 108)))
    kv.free(b)
    kv.pool.drain_events()
    kv.pool.reset_prefix_cache()                           # a still holds its blocks
    assert kv.pool.drain_events() == [BlockRemoved(extend_block_hashes([], list(range(100, 108)), BS))]
    kv.free(a)
    kv.pool.reset_prefix_cache()
    assert kv.pool.drain_events() == [AllCleared()]


def test_engine_drains_events_consistent_with_its_prefix_hits(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), block_size=BS, max_model_len=64,
                                    kv_cache_memory=None))
    prompt = list(range(1, 19))                            # 4 full blocks + 2 tokens
    engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    events = engine.drain_kv_events()
    stored = replay(events)
    assert set(extend_block_hashes([], prompt, BS)) <= stored
    assert engine.drain_kv_events() == []
    assert replay(engine.kv_cache_snapshot()) == stored
