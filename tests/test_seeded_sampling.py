"""A seed fixes the tokens whichever engine samples them: the same seeded request gives
the same tokens in one engine, split between a prefill engine (first token) and a decode
engine (the rest), and resumed in a second engine from any position (a migration re-sends
prompt + output so far). Requests without a seed get fresh randomness each."""

import msgspec
import pytest

from golden import random_prompt
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.types import SamplingParams

SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    cfg = EngineConfig(model=str(tiny_llama_dir), max_model_len=512)
    a, b = LLMEngine(cfg), LLMEngine(cfg)
    yield a, b
    for e in (a, b):
        assert e.stats().kv_blocks_in_use == 0


def _with(params: SamplingParams, **changes) -> SamplingParams:
    return msgspec.structs.replace(params, **changes)


def test_a_seeded_request_resumed_in_another_engine_continues_identically(engines):
    a, b = engines
    prompt = random_prompt(40, seed=21)
    full = a.generate([prompt], SEEDED)[0]
    assert len(set(full)) > 3          # really sampled, not a degenerate distribution
    for cut in (1, 9, 23):
        rest = b.generate([prompt + full[:cut]], _with(SEEDED, max_tokens=len(full) - cut))[0]
        assert rest == full[cut:], f"resumed after {cut} tokens"


def test_a_seeded_request_split_between_prefill_and_decode_engines_matches_one_engine(engines):
    p, d = engines
    prompt = random_prompt(70, seed=22)
    want = d.generate([prompt], SEEDED)[0]
    d.kv_manager.pool.reset_prefix_cache()
    # P samples the first token only (as a prefill worker does), D the rest.
    p.add_request("split", prompt, _with(SEEDED, max_tokens=1), hold=True)
    first = None
    while first is None:
        for out in p.step():
            if out.new_token_ids:
                first, p_blocks = out.new_token_ids[0], out.kv_progress.block_ids
    d_blocks = d.reserve("split", prompt, SEEDED)
    d.runner.kv[d_blocks] = p.runner.kv[p_blocks]
    p.release("split")
    d.commit_reserved("split", len(prompt), first)
    got = []
    while d.has_unfinished_requests():
        for out in d.step():
            got.extend(out.new_token_ids)
    assert got == want


def test_requests_without_a_seed_get_fresh_randomness(engines):
    a, _ = engines
    prompt = random_prompt(30, seed=23)
    unseeded = _with(SEEDED, seed=None)
    assert a.generate([prompt], unseeded)[0] != a.generate([prompt], unseeded)[0]


def test_neighbouring_seeds_give_different_tokens(engines):
    a, _ = engines
    prompt = random_prompt(30, seed=24)
    outs = [tuple(a.generate([prompt], _with(SEEDED, seed=s))[0]) for s in (0, 1, 2, -1)]
    assert len(set(outs)) == 4
