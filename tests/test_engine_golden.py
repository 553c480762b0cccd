"""The paged engine must produce exactly the tokens transformers produces, whatever the
batching, chunking, prefix caching or preemption did on the way."""

import pytest

from golden import hf_greedy, random_prompt
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.types import SamplingParams

NEW = 64
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), **kw))


def assert_golden(eng, model_dir, prompts):
    outs = eng.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(model_dir, p, NEW)
    assert eng.stats().kv_blocks_in_use == 0


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_single_request_matches_transformers(which, request):
    model_dir = request.getfixturevalue(which)
    assert_golden(engine(model_dir), model_dir, [random_prompt(37, seed=1)])


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_eight_concurrent_requests_of_different_lengths(which, request):
    model_dir = request.getfixturevalue(which)
    prompts = [random_prompt(n, seed=n) for n in (1, 5, 16, 17, 40, 77, 130, 250)]
    assert_golden(engine(model_dir), model_dir, prompts)


def test_shared_prefix_hits_the_cache(tiny_llama_dir):
    eng = engine(tiny_llama_dir)
    prefix = random_prompt(96, seed=7)
    first = prefix + random_prompt(9, seed=8)
    assert_golden(eng, tiny_llama_dir, [first])
    hits_before = eng.stats().prefix_cache_hits_tokens
    others = [prefix + random_prompt(5 + i, seed=20 + i) for i in range(3)]
    assert_golden(eng, tiny_llama_dir, others)
    # Each later request reuses all 6 full blocks of the 96-token prefix.
    assert eng.stats().prefix_cache_hits_tokens - hits_before == 3 * 96


def test_prompt_longer_than_token_budget_is_chunked(tiny_llama_dir):
    eng = engine(tiny_llama_dir, max_num_batched_tokens=32)
    assert_golden(eng, tiny_llama_dir, [random_prompt(300, seed=3), random_prompt(45, seed=4)])


def test_small_pool_forces_preemption_without_changing_output(tiny_llama_dir):
    # 24 blocks x 16 tokens = 384 tokens for 4 requests that need ~150 each.
    eng = engine(tiny_llama_dir, max_model_len=256, kv_cache_memory=24 * 16 * 512)
    assert eng.kv_manager.num_blocks == 24
    prompts = [random_prompt(n, seed=n) for n in (80, 90, 100, 70)]
    assert_golden(eng, tiny_llama_dir, prompts)
    assert eng.stats().num_preemptions > 0


def test_bfloat16_engine_runs_and_frees(tiny_llama_dir):
    eng = engine(tiny_llama_dir, dtype="bfloat16")
    out = eng.generate([random_prompt(20, seed=1)], GREEDY)
    assert len(out[0]) == NEW and eng.layout.dtype == "bfloat16"
    assert eng.stats().kv_blocks_in_use == 0
