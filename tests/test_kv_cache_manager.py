"""Block accounting and prefix caching, without a model."""

import pytest

from splitserve.engine.block_pool import BlockPool, NoFreeBlocksError
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.types import SamplingParams

BS = 4


def req(rid, tokens, max_tokens=4):
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0), (), 0)


def test_pool_refcounts_and_double_free():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_used_blocks == 3
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a[0]])


def test_prefix_hit_reuses_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(16, BS)
    a = req("a", list(range(10)))          # 2 full blocks + 2 tokens
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_computed_blocks(a)
    b = req("b", list(range(8)) + [99, 98])
    hits = kv.find_cached_prefix(b)
    assert hits == kv.block_table("a")[:2]
    # Exactly-cached prompt: the last block is not reused, one token must still run.
    c = req("c", list(range(8)))
    assert len(kv.find_cached_prefix(c)) == 1
    kv.free(a)
    assert kv.num_used_blocks == 0
    # Freed cached blocks still hit until evicted.
    assert kv.find_cached_prefix(b) == hits
    assert kv.allocate(b, 2, hits)
    assert kv.block_table("b")[:2] == hits
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_eviction_is_lru_and_drops_the_hash():
    kv = KVCacheManager(4, BS)
    a = req("a", list(range(8)))
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    kv.free(a)
    big = req("big", list(range(100, 116)))
    assert kv.allocate(big, 16)            # needs all 4 blocks: evicts a's cached blocks
    assert kv.find_cached_prefix(req("a2", list(range(8)) + [1])) == []
    kv.free(big)


def test_allocation_counts_revived_cached_blocks():
    kv = KVCacheManager(3, BS)
    a = req("a", list(range(8)))
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    kv.free(a)                              # 2 cached-free blocks + 1 plain free
    b = req("b", list(range(8)) + list(range(50, 58)))   # hits 2, needs 2 more: 4 > 3
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    assert not kv.can_allocate(b, 8, hits)
    assert kv.num_used_blocks == 0


def test_scheduler_budget_chunks_and_preempts():
    kv = KVCacheManager(6, BS)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = req("a", list(range(12))), req("b", list(range(50, 60)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 8)]
    assert not out.scheduled[0].samples
    a.num_computed_tokens += 8
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 4), ("b", 4)]
    a.num_computed_tokens += 4
    b.num_computed_tokens += 4
    a.append_output(1)
    # a takes a 4th block for its 13th token, leaving 1 free; b wants its 6 remaining
    # prompt tokens (2 more blocks) and cannot get them, so b (the latest) is preempted.
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1)]
    assert out.preempted == ["b"] and b.num_computed_tokens == 0
    for r in (a, b):
        sched.finish(r)
    assert kv.num_used_blocks == 0


def test_scheduler_preempts_latest_when_blocks_run_out():
    kv = KVCacheManager(4, BS)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = req("a", list(range(8))), req("b", list(range(50, 58)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert len(out.scheduled) == 2 and kv.num_used_blocks == 4
    for s in out.scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
        s.request.append_output(7)
    out = sched.schedule()                  # both need a 3rd block; none free
    assert out.preempted == ["b"]
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    assert b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert sched.num_preemptions == 1
    for r in (a, b):
        sched.finish(r)
    assert kv.num_used_blocks == 0
