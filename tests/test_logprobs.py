"""Logprobs a vLLM user reads: each sampled token's log-probability and the k most likely
tokens', equal to the log-softmax of the model's logits (transformers' on the same
tokens), before temperature and top-p as vLLM's default raw_logprobs mode; the first
token's travel from a prefill engine to the decode engine with it."""

import pytest
import torch

from golden import hf_model, random_prompt
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.types import SamplingError, SamplingParams


@pytest.fixture(scope="module")
def eng(tiny_llama_dir):
    e = LLMEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=512))
    yield e
    assert e.stats().kv_blocks_in_use == 0


def _run(eng, prompt, params):
    eng.add_request("lp", prompt, params)
    tokens, logprobs = [], []
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.logprobs or [])
    return tokens, logprobs


def _reference(model_dir, prompt, tokens) -> torch.Tensor:
    """transformers' log-softmax at each generated token's position: [len(tokens), V]."""
    with torch.inference_mode():
        logits = hf_model(str(model_dir))(torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_models_log_softmax_as_transformers_computes_it(eng, tiny_llama_dir, temperature):
    prompt = random_prompt(33, seed=31)
    params = SamplingParams(max_tokens=12, temperature=temperature, top_p=0.9, seed=5,
                            ignore_eos=True, logprobs=5)
    tokens, logprobs = _run(eng, prompt, params)
    assert len(logprobs) == len(tokens) == 12
    ref = _reference(tiny_llama_dir, prompt, tokens)
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        assert lp.token_id == t
        assert lp.logprob == pytest.approx(ref[i, t].item(), abs=1e-4)
        want = ref[i].topk(5)
        assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert [tid for tid, _ in lp.top] == want.indices.tolist()


def test_logprobs_zero_gives_the_sampled_token_only_and_none_gives_nothing(eng):
    prompt = random_prompt(20, seed=32)
    _, zero = _run(eng, prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=0))
    assert len(zero) == 3 and all(lp.top == () and lp.logprob <= 0 for lp in zero)
    _, none = _run(eng, prompt, SamplingParams(max_tokens=3, temperature=0))
    assert none == []


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_logprobs_out_of_range_names_the_parameter(bad):
    with pytest.raises(SamplingError) as e:
        SamplingParams(logprobs=bad)
    assert e.value.param == "logprobs"


def test_the_first_tokens_logprobs_travel_from_prefill_to_decode(eng, tiny_llama_dir):
    d = LLMEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=512))
    prompt = random_prompt(50, seed=33)
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=9, ignore_eos=True, logprobs=3)
    want = _run(d, prompt, params)
    d.kv_manager.pool.reset_prefix_cache()
    eng.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.8, seed=9,
                                                ignore_eos=True, logprobs=3), hold=True)
    first = None
    while first is None:
        for out in eng.step():
            if out.new_token_ids:
                first, blocks = out, out.kv_progress.block_ids
    d_blocks = d.reserve("lp", prompt, params)
    d.runner.kv[d_blocks] = eng.runner.kv[blocks]
    eng.release("p")
    d.commit_reserved("lp", len(prompt), first.new_token_ids[0], first.logprobs[0])
    tokens, logprobs = [], []
    while d.has_unfinished_requests():
        for out in d.step():
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.logprobs or [])
    assert (tokens, logprobs) == want
    assert d.stats().kv_blocks_in_use == 0
