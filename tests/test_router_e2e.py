"""KV-aware routing measured on a real cluster (`serve --prefill 2 --decode 1`): 24
requests built from 4 distinct 2,000-token prefixes with different suffixes, in shuffled
order. With --router kv the prefill workers' prefix caches (their own metrics) hit on at
least 90% of the tokens that could hit; with round-robin clearly less. With all-distinct
prompts the kv router still spreads work over both prefill workers."""

from __future__ import annotations

import random

import httpx
import pytest

from live_server import start_serve
from procs import metric_value

PREFIX_TOKENS, NUM_PREFIXES, REQUESTS_PER_PREFIX = 2000, 4, 6
ARGS = ("--prefill", "2", "--decode", "1", "--max-model-len", "4096",
        "--kv-cache-memory", "32MiB", "--served-model-name", "tiny")


def _prompts(seed: int) -> list[tuple[int, list[int]]]:
    """(prefix number, prompt) in shuffled order; tokens stay below the byte vocabulary's
    special tokens."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 250) for _ in range(PREFIX_TOKENS)] for _ in range(NUM_PREFIXES)]
    prompts = [(i, prefixes[i] + [rng.randrange(3, 250) for _ in range(rng.randrange(5, 40))])
               for i in range(NUM_PREFIXES) for _ in range(REQUESTS_PER_PREFIX)]
    rng.shuffle(prompts)
    return prompts


def _prefill_counters(srv) -> dict[str, tuple[float, float]]:
    """Per prefill worker: (prefix-cache hit tokens, looked-up tokens)."""
    return {url: (metric_value(f"{url}/metrics", "splitserve_prefix_cache_hits_total"),
                  metric_value(f"{url}/metrics", "splitserve_prefix_cache_queries_total"))
            for url in srv.workers["prefill"]}


def _complete(http: httpx.Client, srv, prompt: list[int]) -> None:
    resp = http.post(f"{srv.base_url}/v1/completions",
                     json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text


def _hit_rate(router: str, tiny_llama_dir, workdir) -> tuple[float, dict]:
    srv = start_serve(tiny_llama_dir, workdir, *ARGS, "--router", router)
    try:
        before = _prefill_counters(srv)
        with httpx.Client(timeout=120) as http:
            for _, prompt in _prompts(seed=7):
                _complete(http, srv, prompt)
        after = _prefill_counters(srv)
        hits = sum(after[u][0] - before[u][0] for u in after)
        # Every request but the first of each prefix could find its prefix cached.
        could_hit = (REQUESTS_PER_PREFIX - 1) * NUM_PREFIXES * PREFIX_TOKENS
        distinct = None
        if router == "kv":
            before = _prefill_counters(srv)
            rng = random.Random(11)
            with httpx.Client(timeout=120) as http:
                for _ in range(8):
                    _complete(http, srv, [rng.randrange(3, 250) for _ in range(300)])
            after = _prefill_counters(srv)
            distinct = {u: after[u][1] - before[u][1] for u in after}
        return hits / could_hit, distinct
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


@pytest.mark.timeout(300)
def test_kv_router_follows_cached_prefixes_and_round_robin_does_not(tiny_llama_dir, tmp_path):
    (tmp_path / "kv").mkdir()
    (tmp_path / "rr").mkdir()
    kv_rate, distinct = _hit_rate("kv", tiny_llama_dir, tmp_path / "kv")
    rr_rate, _ = _hit_rate("round-robin", tiny_llama_dir, tmp_path / "rr")
    print(f"prefix-cache hit rate: kv {kv_rate:.1%}, round-robin {rr_rate:.1%}; "
          f"distinct prompts' tokens per prefill worker: {distinct}")
    assert kv_rate >= 0.9
    assert rr_rate <= kv_rate - 0.1
    # All-distinct prompts: no cache to follow, so load decides and both workers compute.
    assert all(tokens >= 300 for tokens in distinct.values()), distinct
