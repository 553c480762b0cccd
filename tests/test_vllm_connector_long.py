"""A 131,000-token prompt through two plain `vllm serve` disaggregated with
SplitserveConnector behind `splitserve vllm-proxy`: the whole prompt's KV arrives
verified (every block, no fallback), streamed while the prefill server is still
computing its chunks, and the greedy answer equals vLLM's own aggregated answer.

A tiny random Llama with 131,072 positions (head_dim 32: the smallest vLLM CPU's
attention serves). vLLM CPU prefills 131k tokens of it in ~80 s on one core, 64k in ~20 s
(2026-12-03, this 2-core machine). To keep the test near 3 minutes, the aggregated
reference is computed by the decode server itself (a request without kv_transfer_params:
the connector stays idle for it) while the prefill server computes the disaggregated
request, each on its own core. Prefix caching is off on both servers, so the
reference never lends its blocks to the transfer (or the other way round).
"""

from __future__ import annotations

import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from procs import metric_value

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

from splitserve.bench.vllm_launch import BLOCK_SIZE, VllmPair  # noqa: E402
from splitserve.model.tiny import make_tiny_llama  # noqa: E402

POSITIONS = 131_072
LENGTH = 131_000
NEW_TOKENS = 16
LAYERS, KV_HEADS, HEAD_DIM, FLOAT32 = 2, 2, 32, 4


def _complete(url: str, prompt: list[int]) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=900)
    assert r.status_code == 200, r.text[:2000]
    return r.json()["choices"][0]["token_ids"]


def _wait(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_131k_prompt_transferred_whole_equals_aggregated(tmp_path):
    model = make_tiny_llama(tmp_path / "model", max_position_embeddings=POSITIONS,
                            hidden_size=128, head_dim=HEAD_DIM)
    rng = random.Random(8)
    prompt = [rng.randrange(256) for _ in range(LENGTH)]     # byte tokens: any id is text
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(POSITIONS),
            "--served-model-name", "tiny", "--no-enable-prefix-caching"]
    cores = sorted(os.sched_getaffinity(0))
    with VllmPair(str(model), tmp_path, p_cores=cores[:1], d_cores=cores[-1:], args=args,
                  transfer={"transport": "tcp"}) as pair:
        d_metrics, p_metrics = pair.d.base_url + "/metrics", pair.p.base_url + "/metrics"
        with ThreadPoolExecutor(2) as ex:
            disaggregated = ex.submit(_complete, pair.base_url, prompt)
            # The reference only once D has started the load: a local prefill running on D
            # takes its scheduler's whole token budget, and a request waiting for remote KV
            # is not scheduled (its load not started) until that prefill is done.
            _wait(lambda: "decode connected" in pair.p.log(), "D to start loading the KV",
                  timeout=300)
            reference = ex.submit(_complete, pair.d.base_url, prompt)
            assert disaggregated.result() == reference.result()

        blocks = -(-LENGTH // BLOCK_SIZE)
        nbytes = blocks * LAYERS * 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * FLOAT32
        assert metric_value(d_metrics, "splitserve_kv_transfers_total", outcome="ok") == 1
        assert metric_value(d_metrics, "splitserve_kv_transfer_fallbacks_total") == 0
        assert metric_value(d_metrics, "splitserve_kv_transfer_bytes_total",
                            direction="received") == nbytes
        assert metric_value(p_metrics, "splitserve_kv_transfer_bytes_total",
                            direction="sent") == nbytes
        assert re.search(rf"KV loaded, {blocks} blocks, {nbytes} bytes in [\d.]+s over tcp "
                         r"\(0 resumes, 0 checksum failures\)", pair.d.log())
        # P handed blocks to the sender chunk by chunk (2,048 tokens a step), not at the end.
        early = re.findall(rf"all {blocks} blocks handed to the sender, (\d+) of them while "
                           r"the prompt was still computing", pair.p.log())
        assert early and int(early[0]) > blocks // 2, early
        for url in (p_metrics, d_metrics):
            _wait(lambda: metric_value(url, "vllm:kv_cache_usage_perc") == 0,
                  f"{url} to free every KV block")
