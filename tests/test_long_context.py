"""Long context, the case that motivated splitserve: a 131,000-token prompt's KV streams
from the prefill worker to the decode worker while the prefill runs, arrives whole (no
fallback, no recompute), and the generation equals aggregated serving token for token.
Heavy (many minutes on 2 CPU cores): `make test-heavy`, not in CI."""

import time

import pytest

from golden import random_prompt
from splitserve.model.tiny import make_tiny_llama
from workers import generate, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

PROMPT_TOKENS = 131_000
NEW = 64


def test_131k_prompt_disaggregated_equals_aggregated(tmp_path, record_property):
    model = make_tiny_llama(tmp_path / "llama-131k", max_position_embeddings=131072)
    prompt = random_prompt(PROMPT_TOKENS, seed=131)
    both = start_worker("both", model, tmp_path)
    try:
        t0 = time.monotonic()
        status, want, _ = generate(both, "agg-131k", prompt, NEW, None, timeout=1800)
        agg_s = time.monotonic() - t0
        assert status == 200 and len(want) == NEW
    finally:
        both.stop()
    prefill = start_worker("prefill", model, tmp_path)
    decode = start_worker("decode", model, tmp_path, "--kv-transport", "tcp")
    try:
        t0 = time.monotonic()
        status, got, chunks = generate(decode, "disagg-131k", prompt, NEW, prefill, timeout=1800)
        disagg_s = time.monotonic() - t0
        assert status == 200
        assert got == want
        assert chunks[-1].num_transferred_tokens == PROMPT_TOKENS
        assert decode.metric("splitserve_kv_transfers_total", outcome="ok") == 1
        assert decode.metric("splitserve_kv_transfer_fallbacks_total") == 0
        sent = prefill.metric("splitserve_kv_transfer_bytes_total", direction="sent")
        assert sent >= PROMPT_TOKENS * 512   # 2 layers x K,V x 2 heads x 16 dims x fp32
        for w in (prefill, decode):
            assert w.wait_metric("splitserve_kv_blocks_in_use", 0) == 0
        record_property("aggregated_s", round(agg_s, 1))
        record_property("disaggregated_s", round(disagg_s, 1))
        record_property("kv_bytes", sent)
        print(f"\n131k: aggregated {agg_s:.1f}s, disaggregated {disagg_s:.1f}s, {sent / 1e6:.0f} MB of KV sent")
    finally:
        prefill.stop()
        decode.stop()
