"""Routing policies: kv follows cached prefixes and still spreads load; round-robin and
random behave; decode picks by capacity and load; the in-flight tracker raises stale
loads. The prefix test mirrors issue 4's measurement on a simulated cluster."""

import math
import random

import pytest

from splitserve.router import (
    BlockStored, InflightTracker, KVEventBatch, KVIndex, KvPolicy, RouteRequest,
    RouterConfig, WorkerLoad, make_policy)
from splitserve.router.simple import RandomPolicy, RoundRobinPolicy
from splitserve.worker.prefill_rate import PrefillRateMeter

BS = 16


def loads(*ids: str, **kw) -> list[WorkerLoad]:
    return [WorkerLoad(worker_id=w, **kw) for w in ids]


def request(index: KVIndex, token_ids: list[int]) -> RouteRequest:
    return RouteRequest(len(token_ids), index.block_hashes(token_ids))


def store(index: KVIndex, worker_id: str, token_ids: list[int], seq: int = 0) -> None:
    index.apply(KVEventBatch(worker_id, 1, seq, [BlockStored(index.block_hashes(token_ids))]))


def test_kv_prefers_the_longest_cached_prefix():
    index = KVIndex(BS)
    prompt = list(range(160))                               # 10 blocks
    store(index, "a", prompt[:32])
    store(index, "b", prompt[:128])
    store(index, "c", [7] * 160)
    d = KvPolicy(index).select_prefill(loads("a", "b", "c"), request(index, prompt + [1, 2]))
    assert (d.worker_id, d.overlap_blocks, d.cost) == ("b", 8, 3.0)   # 11 blocks, 8 cached


@pytest.mark.parametrize("weight, expected", [(1.0, "b"), (5.0, "a")])
def test_kv_trades_overlap_against_queued_prefill_by_weight(weight, expected):
    index = KVIndex(BS)
    prompt = list(range(160))
    store(index, "a", prompt)                               # a has all 10 blocks ...
    busy = [WorkerLoad(worker_id="a", num_pending_prefill_tokens=BS * 40),
            WorkerLoad(worker_id="b")]                       # ... but 40 blocks queued
    # cost(a) = 40 queued; cost(b) = weight x 10 to compute.
    assert KvPolicy(index, weight).select_prefill(busy, request(index, prompt)).worker_id == expected


def test_kv_breaks_cost_ties_by_fewer_requests_then_alternates():
    index = KVIndex(BS)
    policy = KvPolicy(index)
    req = RouteRequest(100)
    fewer = [WorkerLoad(worker_id="a", num_requests_running=2), WorkerLoad(worker_id="b")]
    assert policy.select_prefill(fewer, req).worker_id == "b"
    picks = [policy.select_prefill(loads("a", "b"), req).worker_id for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"]


def simulate(policy_name: str, prompts: list[list[int]], workers=("p0", "p1")):
    """Route prompts one by one to simulated prefill workers whose caches hold everything
    they computed; returns (cached blocks / blocks that could have been cached, tokens
    routed per worker)."""
    index = KVIndex(BS)
    policy = make_policy(RouterConfig(policy=policy_name, seed=0), index)
    tracker = InflightTracker()
    caches = {w: set() for w in workers}
    seqs = dict.fromkeys(workers, -1)
    seen: set[int] = set()
    hit = possible = 0
    tokens = dict.fromkeys(workers, 0)
    for i, prompt in enumerate(prompts):
        req = request(index, prompt)
        w = policy.select_prefill(tracker.apply(loads(*workers)), req).worker_id
        cached = next((n for n, h in enumerate(req.block_hashes) if h not in caches[w]),
                      len(req.block_hashes))
        hit += cached
        possible += next((n for n, h in enumerate(req.block_hashes) if h not in seen),
                         len(req.block_hashes))
        tracker.prefill_started(f"r{i}", w, len(prompt) - cached * BS)
        # The worker stores the blocks and reports them; the prefill stays in flight,
        # so load accumulates as in a burst.
        caches[w].update(req.block_hashes)
        seen.update(req.block_hashes)
        seqs[w] += 1
        store(index, w, prompt, seq=seqs[w])
        tokens[w] += len(prompt)
    return hit / possible if possible else 1.0, tokens


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50000) for _ in range(2000)] for _ in range(4)]
    prompts = [p + [rng.randrange(50000) for _ in range(rng.randrange(20, 200))]
               for p in prefixes for _ in range(6)]
    rng.shuffle(prompts)
    return prompts


def test_kv_routes_shared_prefixes_to_their_cache_and_round_robin_does_not():
    prompts = shared_prefix_prompts()
    kv_rate, kv_tokens = simulate("kv", prompts)
    rr_rate, _ = simulate("round-robin", prompts)
    assert kv_rate >= 0.9, kv_rate
    # Round-robin misses each prefix once per worker (here 0.8).
    assert rr_rate < kv_rate - 0.1, (rr_rate, kv_rate)
    assert min(kv_tokens.values()) > 0                      # both workers got prefixes


def test_kv_spreads_load_when_prefixes_are_all_distinct():
    rng = random.Random(1)
    prompts = [[rng.randrange(50000) for _ in range(rng.randrange(100, 3000))] for _ in range(40)]
    _, tokens = simulate("kv", prompts)
    total = sum(tokens.values())
    assert all(t >= 0.4 * total for t in tokens.values()), tokens


def test_kv_predicts_the_prefix_before_events_arrive():
    index = KVIndex(BS)
    policy = KvPolicy(index)
    prompt = list(range(2000))
    first = policy.select_prefill(loads("p0", "p1"), request(index, prompt + [1]))
    # No event yet: the second request with that prefix still follows the first.
    second = policy.select_prefill(loads("p0", "p1"), request(index, prompt + [2]))
    assert second.worker_id == first.worker_id and second.overlap_blocks == 125


def test_decode_picks_a_worker_that_fits_with_fewest_requests_then_most_free():
    policy = KvPolicy(KVIndex(BS))
    req = RouteRequest(BS * 10)                              # needs 11 blocks
    workers = [
        WorkerLoad(worker_id="full", kv_blocks_total=100, kv_blocks_in_use=95),
        WorkerLoad(worker_id="busy", kv_blocks_total=100, num_requests_running=5),
        WorkerLoad(worker_id="roomy", kv_blocks_total=100, kv_blocks_in_use=10, num_requests_running=1),
        WorkerLoad(worker_id="tight", kv_blocks_total=100, kv_blocks_in_use=80, num_requests_running=1),
    ]
    assert policy.select_decode(workers, req).worker_id == "roomy"
    # Capacity not reported yet counts as room, not as full.
    assert policy.select_decode([WorkerLoad(worker_id="new"), workers[0]], req).worker_id == "new"
    # Nobody fits: the most free KV.
    cramped = [WorkerLoad(worker_id="x", kv_blocks_total=10, kv_blocks_in_use=5),
               WorkerLoad(worker_id="y", kv_blocks_total=10, kv_blocks_in_use=2)]
    assert policy.select_decode(cramped, req).worker_id == "y"


def test_round_robin_cycles_each_role_in_id_order():
    policy = RoundRobinPolicy()
    req = RouteRequest(10)
    picks = [policy.select_prefill(loads("b", "a", "c"), req).worker_id for _ in range(4)]
    assert picks == ["a", "b", "c", "a"]
    assert policy.select_decode(loads("d1", "d0"), req).worker_id == "d0"


def test_random_is_seeded_and_uses_every_worker():
    req = RouteRequest(10)

    def picks(seed: int) -> list[str]:
        policy = RandomPolicy(seed)
        return [policy.select_decode(loads("a", "b", "c"), req).worker_id for _ in range(60)]

    assert picks(3) == picks(3)
    assert set(picks(3)) == {"a", "b", "c"}


@pytest.mark.parametrize("name", ["round-robin", "random", "kv"])
def test_no_candidates_is_a_clear_error(name):
    policy = make_policy(RouterConfig(policy=name), KVIndex(BS))
    with pytest.raises(ValueError, match="at least one prefill candidate"):
        policy.select_prefill([], RouteRequest(1))
    with pytest.raises(ValueError, match="at least one decode candidate"):
        policy.select_decode([], RouteRequest(1))


def test_router_config_and_factory_validate():
    with pytest.raises(ValueError, match="one of"):
        RouterConfig(policy="least-loaded")
    with pytest.raises(ValueError, match="overlap_weight"):
        RouterConfig(overlap_weight=-1)
    with pytest.raises(ValueError, match="needs a KVIndex"):
        make_policy(RouterConfig(policy="kv"))
    assert make_policy(RouterConfig(policy="round-robin")).name == "round-robin"


def test_inflight_tracker_raises_stale_loads_to_what_was_routed():
    tracker = InflightTracker()
    tracker.prefill_started("r1", "agg", 300)
    tracker.decode_started("r1", "agg", 20)     # aggregated: one request, both phases
    tracker.decode_started("r2", "d0", 5)
    reported = [WorkerLoad(worker_id="agg", num_pending_prefill_tokens=100),
                WorkerLoad(worker_id="d0", num_requests_running=4, kv_blocks_in_use=50)]
    agg, d0 = tracker.apply(reported)
    assert (agg.num_pending_prefill_tokens, agg.num_requests_running, agg.kv_blocks_in_use) == (300, 1, 20)
    assert (d0.num_requests_running, d0.kv_blocks_in_use) == (4, 50)   # the report is larger
    tracker.prefill_finished("r1")
    tracker.decode_finished("r1")
    assert tracker.apply(reported)[0] == reported[0]


def test_expected_prefill_wait_is_pending_tokens_over_the_measured_rate():
    assert WorkerLoad(worker_id="p", num_pending_prefill_tokens=5000,
                      prefill_tokens_per_s=1000.0).expected_prefill_wait_s == 5.0
    # An unmeasured worker is not judged at all (rather than infinitely slow).
    assert WorkerLoad(worker_id="p", num_pending_prefill_tokens=5000).expected_prefill_wait_s is None


def test_prefill_rate_measures_capacity_over_busy_time_not_demand():
    meter = PrefillRateMeter(tau_s=10.0)
    assert meter.observe(0.0, 0, 0) == 0.0                  # nothing measured yet: unknown
    assert meter.observe(1.0, 0, 0) == 0.0                  # idle is not slow
    assert meter.observe(2.0, 500, 4000) == 0.0             # work arrived and ran while not sampled busy
    assert meter.observe(3.0, 1500, 3000) == pytest.approx(1000.0)   # busy: 1000 tokens in 1 s
    # Idle time in between does not dilute it; an engine step straddling samples averages out.
    assert meter.observe(60.0, 4000, 0) == pytest.approx((1000 * math.exp(-5.7) + 2500) / (math.exp(-5.7) + 57))
    meter = PrefillRateMeter()
    for t, done in [(0.0, 0), (0.2, 0), (0.4, 800), (0.6, 800), (0.8, 1600)]:
        rate = meter.observe(t, done, 1000)
    assert rate == pytest.approx(2000.0, rel=0.05)          # 1600 tokens over 0.8 busy seconds
    # A restarted engine (counter went back) starts over.
    assert meter.observe(1.0, 10, 1000) == 0.0
