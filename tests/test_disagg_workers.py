"""Disaggregated prefill/decode between real worker processes: the decode worker's output
is token-identical to transformers (and so to aggregated serving) whatever the prompt
length, over tcp and over shared memory, one request or eight at once — and the KV was
transferred, not recomputed."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from golden import hf_greedy, random_prompt
from splitserve.model.tiny import make_tiny_llama
from workers import generate, start_worker

NEW = 16
TRANSPORTS = ("tcp", "shm")


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("long-llama"), max_position_embeddings=40960)


@pytest.fixture(scope="module")
def cluster(long_llama_dir, tmp_path_factory):
    """One prefill worker and a decode worker per transport."""
    wd = tmp_path_factory.mktemp("disagg")
    prefill = start_worker("prefill", long_llama_dir, wd)
    decodes = {t: start_worker("decode", long_llama_dir, wd, "--kv-transport", t, name=f"decode-{t}")
               for t in TRANSPORTS}
    yield prefill, decodes
    try:
        for w in (prefill, *decodes.values()):
            assert w.wait_metric("splitserve_kv_blocks_in_use", 0) == 0, w.log()[-3000:]
            assert w.metric("splitserve_kv_transfer_fallbacks_total") == 0
        assert prefill.wait_metric("splitserve_kv_blocks_pinned", 0) == 0
    finally:
        for w in (prefill, *decodes.values()):
            w.stop()


def check(cluster, transport, rid, prompt, model_dir):
    prefill, decodes = cluster
    status, tokens, chunks = generate(decodes[transport], rid, prompt, NEW, prefill)
    assert status == 200, chunks
    assert tokens == hf_greedy(model_dir, prompt, NEW)
    assert chunks[-1].num_transferred_tokens == len(prompt)   # KV arrived; nothing recomputed
    return chunks


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_prompts_from_one_token_to_thousands(cluster, transport, long_llama_dir):
    d = cluster[1][transport]
    ok_before = d.metric("splitserve_kv_transfers_total", outcome="ok")
    lengths = (1, 15, 16, 17, 300, 2500)
    for n in lengths:
        check(cluster, transport, f"{transport}-len{n}", random_prompt(n, seed=n), long_llama_dir)
    assert d.metric("splitserve_kv_transfers_total", outcome="ok") - ok_before == len(lengths)
    assert d.metric("splitserve_kv_transfer_bytes_total", direction="received") > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_eight_concurrent_requests(cluster, transport, long_llama_dir):
    prompts = [random_prompt(n, seed=100 + n) for n in (3, 40, 129, 260, 500, 777, 1024, 1500)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ip: check(cluster, transport, f"{transport}-c{ip[0]}", ip[1], long_llama_dir),
                      enumerate(prompts)))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_32k_token_prompt(cluster, transport, long_llama_dir):
    prefill = cluster[0]
    sent = prefill.metric("splitserve_kv_transfer_bytes_total", direction="sent")
    check(cluster, transport, f"{transport}-32k", random_prompt(32768, seed=32), long_llama_dir)
    # 2 layers x K,V x 2 KV heads x 16 dims x fp32 = 512 bytes a token, all of it moved.
    assert prefill.metric("splitserve_kv_transfer_bytes_total", direction="sent") - sent >= 32768 * 512


def test_prefill_worker_refuses_generate(cluster):
    prefill = cluster[0]
    status, _, body = generate(prefill, "wrong-role", [1, 2, 3], 4, None)
    assert status == 400 and "prefill worker" in body
