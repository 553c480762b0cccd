"""n > 1 through the OpenAI SDK: n choices by index, whole and streamed, usage counting the
prompt once; with a seed each choice is reproducible (choice i samples with seed + i, so
choice 0 equals the n=1 answer) and the same in `serve --aggregated` and `serve`."""

from __future__ import annotations

import openai
import pytest

from live_server import start_serve

ARGS = ("--max-model-len", "512", "--served-model-name", "tiny")
CHAT = [{"role": "user", "content": "Tell me a story."}]
SEEDED = dict(model="tiny", temperature=0.9, seed=5, max_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    agg = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("n-agg"), *ARGS, "--aggregated")
    disagg = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("n-disagg"), *ARGS)
    yield agg, disagg
    for srv in (agg, disagg):
        for url in srv.worker_urls:
            assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=url) == 0
        assert srv.stop() == 0


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)


def _chat(srv, n: int, stream: bool) -> list[str]:
    with _client(srv) as c:
        if not stream:
            resp = c.chat.completions.create(messages=CHAT, n=n, **SEEDED)
            assert [ch.index for ch in resp.choices] == list(range(n))
            assert resp.usage.completion_tokens == 12 * n and resp.usage.prompt_tokens > 0
            return [ch.message.content for ch in resp.choices]
        texts = [""] * n
        for chunk in c.chat.completions.create(messages=CHAT, n=n, stream=True, **SEEDED):
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
        return texts


def _completions(srv, n: int, stream: bool) -> list[str]:
    with _client(srv) as c:
        if not stream:
            resp = c.completions.create(prompt="Once upon a time", n=n, **SEEDED)
            return [ch.text for ch in sorted(resp.choices, key=lambda ch: ch.index)]
        texts = [""] * n
        for chunk in c.completions.create(prompt="Once upon a time", n=n, stream=True, **SEEDED):
            for ch in chunk.choices:
                texts[ch.index] += ch.text
        return texts


@pytest.mark.parametrize("call", [_chat, _completions])
def test_n_seeded_choices_are_distinct_reproducible_and_equal_across_modes(servers, call):
    agg, disagg = servers
    whole = call(agg, 3, stream=False)
    assert len(set(whole)) == 3 and all(whole)
    assert call(agg, 3, stream=True) == whole
    assert call(disagg, 3, stream=False) == whole
    assert call(disagg, 3, stream=True) == whole
    assert call(agg, 1, stream=False) == whole[:1]


def test_n_out_of_range_is_a_400_naming_n(servers):
    agg, _ = servers
    for n in (0, 65):
        with pytest.raises(openai.BadRequestError) as e, _client(agg) as c:
            c.chat.completions.create(messages=CHAT, n=n, **SEEDED)
        assert e.value.body["param"] == "n"


@pytest.mark.parametrize("mode", ["aggregated", "disaggregated"])
def test_n_choices_share_one_prefill_and_one_kv_transfer(servers, mode):
    """The prompt is computed once (on the prefill worker, transferred once), and the
    other choices reuse its blocks from the prefix cache of choice 0's worker."""
    srv = servers[0] if mode == "aggregated" else servers[1]
    compute_url = srv.workers["both" if mode == "aggregated" else "prefill"][0]
    decode_url = srv.workers["both" if mode == "aggregated" else "decode"][0]
    prompt = [(7 * i + 3) % 200 + 10 for i in range(100)]    # 6 full blocks of 16, 4 tokens over
    computed = srv.worker_metric("splitserve_prompt_tokens_computed_total", compute_url)
    decode_computed = srv.worker_metric("splitserve_prompt_tokens_computed_total", decode_url)
    transfers = srv.worker_metric("splitserve_kv_transfers_total", decode_url)
    hits = srv.worker_metric("splitserve_prefix_cache_hits_total", decode_url)
    with _client(srv) as c:
        resp = c.completions.create(prompt=prompt, n=3, **SEEDED)
    assert len({ch.text for ch in resp.choices}) == 3 and resp.usage.prompt_tokens == 100
    # Choice 0's whole prompt where it was computed, plus each sibling's 4-token tail.
    tails = 2 * 4 if mode == "aggregated" else 0
    assert srv.worker_metric("splitserve_prompt_tokens_computed_total", compute_url) - computed == 100 + tails
    if mode == "disaggregated":
        assert srv.worker_metric("splitserve_kv_transfers_total", decode_url) - transfers == 1
        assert srv.worker_metric("splitserve_prompt_tokens_computed_total", decode_url) - decode_computed == 2 * 4
    assert srv.worker_metric("splitserve_prefix_cache_hits_total", decode_url) - hits >= 2 * 96
