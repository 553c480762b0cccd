"""Engine behaviour a worker relies on: sampling controls, stop conditions, aborts,
errors, and that every block comes back."""

import pytest

from golden import random_prompt
from splitserve.config import ConfigError, EngineConfig
from splitserve.engine.llm_engine import LLMEngine, RequestError
from splitserve.engine.types import FinishReason, SamplingError, SamplingParams


@pytest.fixture(scope="module")
def eng(tiny_llama_dir):
    e = LLMEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=512))
    yield e
    assert e.stats().kv_blocks_in_use == 0


def run(eng, prompt, params):
    return eng.generate([prompt], params)[0]


def test_seed_makes_sampling_reproducible(eng):
    p = random_prompt(30, seed=5)
    a = run(eng, p, SamplingParams(max_tokens=32, temperature=1.0, seed=42, ignore_eos=True))
    b = run(eng, p, SamplingParams(max_tokens=32, temperature=1.0, seed=42, ignore_eos=True))
    c = run(eng, p, SamplingParams(max_tokens=32, temperature=1.0, seed=43, ignore_eos=True))
    assert a == b and a != c


def test_seeded_request_is_unaffected_by_batch_neighbours(eng):
    p = random_prompt(30, seed=5)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=9, ignore_eos=True)
    alone = run(eng, p, params)
    noisy = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    eng.add_request("n1", random_prompt(12, seed=1), noisy)
    eng.add_request("n2", random_prompt(50, seed=2), noisy)
    together = run(eng, p, params)
    while eng.has_unfinished_requests():
        eng.step()
    assert alone == together


def test_top_k_one_is_greedy(eng):
    p = random_prompt(25, seed=6)
    greedy = run(eng, p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert run(eng, p, SamplingParams(max_tokens=20, temperature=1.5, top_k=1, ignore_eos=True)) == greedy
    assert run(eng, p, SamplingParams(max_tokens=20, temperature=1.5, top_p=1e-6, ignore_eos=True)) == greedy


def test_stop_token_ids_and_eos(eng):
    p = random_prompt(25, seed=6)
    ref = run(eng, p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    stop_at = ref[5]
    first = ref.index(stop_at)
    eng.add_request("s", p, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_at,)))
    outs = []
    while eng.has_unfinished_requests():
        outs.extend(eng.step())
    assert [t for o in outs for t in o.new_token_ids] == ref[:first + 1]
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.STOP


def test_max_tokens_finishes_with_length(eng):
    eng.add_request("m", random_prompt(10, seed=1), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    outs = []
    while eng.has_unfinished_requests():
        outs.extend(eng.step())
    assert len(outs) == 3 and outs[-1].finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_and_reports(eng):
    eng.add_request("x", random_prompt(200, seed=3), SamplingParams(max_tokens=50, temperature=0))
    eng.step()
    assert eng.stats().kv_blocks_in_use > 0
    eng.abort_request("x")
    eng.abort_request("x")  # idempotent
    outs = eng.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("x", True, FinishReason.ABORT)]
    assert eng.stats().kv_blocks_in_use == 0
    assert not eng.has_unfinished_requests()


def test_bad_requests_are_named_errors(eng):
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(RequestError, match="maximum context length is 512 tokens"):
        eng.add_request("long", [1] * 510, ok)
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("empty", [], ok)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request("vocab", [1, 100000], ok)
    eng.add_request("dup", [1, 2], ok)
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("dup", [1, 2], ok)
    eng.abort_request("dup")
    eng.step()
    with pytest.raises(SamplingError):
        SamplingParams(temperature=-1)
    with pytest.raises(SamplingError):
        SamplingParams(top_p=0)


def test_pool_too_small_for_max_model_len_is_refused(tiny_llama_dir):
    with pytest.raises(ConfigError, match="less than one sequence of max_model_len"):
        LLMEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=1024, kv_cache_memory=4 * 16 * 512))
