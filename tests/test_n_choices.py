"""n > 1, best_of and echo through the OpenAI SDK: n choices by index, whole and streamed,
usage counting the prompt once; with a seed each choice is reproducible (choice i samples
with seed + i, so choice 0 equals the n=1 answer) and the same in `serve --aggregated` and
`serve`; the n choices share one prefill; best_of keeps the most likely; echo prepends the
prompt."""

from __future__ import annotations

import httpx
import openai
import pytest

from live_server import start_serve

# Slow (clusters (aggregated and disaggregated): minutes on 2 cores): run by
# `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

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


def _cumulative(choice) -> float:
    return sum(choice.logprobs.token_logprobs)


@pytest.mark.parametrize("mode", [0, 1])
def test_best_of_returns_the_most_likely_of_its_sequences(servers, mode):
    srv = servers[mode]
    with _client(srv) as c:
        every = c.completions.create(prompt="Once upon a time", n=4, logprobs=0, **SEEDED)
        ranked = sorted(every.choices, key=_cumulative, reverse=True)
        best = c.completions.create(prompt="Once upon a time", n=2, best_of=4, **SEEDED)
        shown = c.completions.create(prompt="Once upon a time", n=1, best_of=4, logprobs=0, **SEEDED)
    assert [ch.text for ch in best.choices] == [ch.text for ch in ranked[:2]]
    assert [ch.index for ch in best.choices] == [0, 1] and best.choices[0].logprobs is None
    # All four sequences were generated, and are counted.
    assert best.usage.completion_tokens == 4 * 12
    assert shown.choices[0].text == ranked[0].text
    # Equal up to float rounding: the sequences ran in batches of other sizes.
    assert shown.choices[0].logprobs.token_logprobs == pytest.approx(ranked[0].logprobs.token_logprobs,
                                                                     abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    (dict(n=3, best_of=2), "best_of must be in [n=3, 64]"),
    (dict(best_of=3, stream=True), "best_of > n cannot be streamed"),
    (dict(best_of=65), "best_of must be in"),
])
def test_invalid_best_of_is_a_400_naming_best_of(servers, extra, message):
    with pytest.raises(openai.BadRequestError) as e, _client(servers[0]) as c:
        c.completions.create(prompt="Once upon a time", **{**SEEDED, **extra})
    assert e.value.body["param"] == "best_of" and message in e.value.body["message"]


def _echoed(srv, stream: bool, **kwargs) -> str:
    with _client(srv) as c:
        if not stream:
            return c.completions.create(model="tiny", echo=True, **kwargs).choices[0].text
        return "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", echo=True, stream=True,
                                                                          **kwargs) if ch.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_the_completion(servers, stream):
    agg, disagg = servers
    greedy = dict(temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
    with _client(agg) as c:
        plain = c.completions.create(model="tiny", prompt="Once upon a time", **greedy).choices[0].text
    for srv in servers:
        assert _echoed(srv, stream, prompt="Once upon a time", **greedy) == "Once upon a time" + plain
    ids = [12, 40, 7, 99]
    decoded = httpx.post(f"{agg.base_url}/detokenize", json={"model": "tiny", "tokens": ids},
                         timeout=30).json()["prompt"]
    assert _echoed(agg, stream, prompt=ids, max_tokens=0) == decoded


def test_echo_with_max_tokens_0_answers_the_prompt_alone(servers):
    with _client(servers[1]) as c:
        resp = c.completions.create(model="tiny", prompt="Just this.", echo=True, max_tokens=0)
    assert resp.choices[0].text == "Just this." and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens > 0


def test_echo_with_logprobs_and_chat_echo_are_400s_naming_echo(servers):
    with _client(servers[0]) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="Hi", echo=True, logprobs=1, max_tokens=2)
        assert e.value.body["param"] == "echo"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body={"echo": True})
        assert e.value.body["param"] == "echo"
