"""The engine hooks a disaggregated request uses, with the KV copied in-process between
two engines: P (hold, progress, release) and D (reserve, commit, fallback continuation).
Output must equal the aggregated engine's, token for token."""

import pytest

from golden import random_prompt
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import CapacityError, LLMEngine, RequestError
from splitserve.engine.types import SamplingParams

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
FIRST = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    cfg = EngineConfig(model=str(tiny_llama_dir), max_model_len=1024, max_num_batched_tokens=64)
    p, d = LLMEngine(cfg), LLMEngine(cfg)
    yield p, d
    for e in (p, d):
        assert e.stats().kv_blocks_in_use == 0


def prefill_on_p(p: LLMEngine, rid: str, prompt: list[int]):
    """Run a held prefill to completion; returns (first token, block ids, ready counts seen)."""
    p.add_request(rid, prompt, FIRST, hold=True)
    ready_seen, first = [], None
    while first is None:
        for out in p.step():
            assert out.request_id == rid and out.kv_progress is not None
            ready_seen.append(out.kv_progress.num_ready_blocks)
            if out.new_token_ids:
                first = out.new_token_ids[0]
                assert out.finished
                blocks = out.kv_progress.block_ids
    return first, blocks, ready_seen


def decode_on_d(d: LLMEngine, rid: str) -> list[int]:
    tokens = []
    while d.has_unfinished_requests():
        for out in d.step():
            tokens.extend(out.new_token_ids)
    return tokens


def test_full_transfer_equals_aggregated(engines):
    p, d = engines
    prompt = random_prompt(300, seed=11)
    want = d.generate([prompt], GREEDY)[0]
    d.kv_manager.pool.reset_prefix_cache()   # D must not have the prompt cached already
    first, p_blocks, ready = prefill_on_p(p, "r1", prompt)
    # 300 tokens in chunks of 64: blocks become ready as chunks finish, never backwards.
    assert ready == sorted(ready) and ready[0] == 4 and ready[-1] == 19
    assert p.stats().num_held_requests == 1
    d_blocks = d.reserve("r1", prompt, GREEDY)
    assert len(d_blocks) == len(p_blocks) == 19
    d.runner.kv[d_blocks] = p.runner.kv[p_blocks]
    p.release("r1")
    assert p.stats().kv_blocks_in_use == 0
    d.commit_reserved("r1", len(prompt), first)
    got = decode_on_d(d, "r1")
    assert got == want


def test_a_request_finished_by_its_first_token_ends_cleanly(engines):
    # max_tokens=1 (or an EOS first token): the commit itself finishes the request.
    p, d = engines
    prompt = random_prompt(40, seed=13)
    first, p_blocks, _ = prefill_on_p(p, "r1-first", prompt)
    d_blocks = d.reserve("r1-first", prompt, FIRST)
    d.runner.kv[d_blocks] = p.runner.kv[p_blocks]
    p.release("r1-first")
    d.commit_reserved("r1-first", len(prompt), first)
    outputs = d.step()
    assert [(o.new_token_ids, o.finished) for o in outputs] == [([first], True)]
    assert not d.has_unfinished_requests() and d.stats().kv_blocks_in_use == 0


def test_partial_transfer_continues_locally(engines):
    p, d = engines
    prompt = random_prompt(200, seed=12)
    want = d.generate([prompt], GREEDY)[0]
    d.kv_manager.pool.reset_prefix_cache()
    p.kv_manager.pool.reset_prefix_cache()
    _, p_blocks, _ = prefill_on_p(p, "r2", prompt)
    d_blocks = d.reserve("r2", prompt, GREEDY)
    d.runner.kv[d_blocks[:5]] = p.runner.kv[p_blocks[:5]]   # P "died" after 5 blocks
    p.release("r2")
    d.commit_reserved("r2", 5 * 16, None)
    outs = []
    while d.has_unfinished_requests():
        outs.extend(d.step())
    assert [t for o in outs for t in o.new_token_ids] == want
    assert outs[-1].num_transferred_tokens == 80


def test_reservation_errors_and_abort(engines, tiny_llama_dir):
    p, d = engines
    with pytest.raises(RequestError, match="no reservation"):
        d.commit_reserved("nope", 10, 1)
    d.reserve("r3", [1, 2, 3], GREEDY)
    # KV in flight is no work for the engine: its driving thread must sleep, not spin.
    assert not d.has_unfinished_requests()
    with pytest.raises(RequestError, match="whole prompt"):
        d.commit_reserved("r3", 2, 5)
    d.abort_request("r3")
    assert d.step()[0].finish_reason.value == "abort"
    small = LLMEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=64, kv_cache_memory=6 * 16 * 512))
    small.reserve("a", [1] * 60, SamplingParams(max_tokens=4))
    with pytest.raises(CapacityError, match="cannot reserve 4 KV blocks"):
        small.reserve("b", [1] * 60, SamplingParams(max_tokens=4))
    small.abort_request("a")
    assert small.stats().kv_blocks_in_use == 0


def test_held_prefill_is_never_preempted(tiny_llama_dir):
    """A peer may be reading a held request's blocks: under block pressure the scheduler
    preempts ordinary requests instead, and the held one keeps every block."""
    eng = LLMEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=256,
                                 kv_cache_memory=17 * 16 * 512, max_num_batched_tokens=32))
    plain = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    prompt = random_prompt(110, seed=1)
    want = eng.generate([prompt], plain)[0]
    eng.kv_manager.pool.reset_prefix_cache()
    eng.add_request("plain", prompt, plain)
    got = []
    for _ in range(4):
        got.extend(t for out in eng.step() for t in out.new_token_ids)
    eng.add_request("held", random_prompt(150, seed=2), FIRST, hold=True)
    tables = set()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.kv_progress:
                tables.add(tuple(out.kv_progress.block_ids))
                if out.finished:
                    eng.release("held")      # the peer has read it
            else:
                got.extend(out.new_token_ids)
    # plain fills 7 blocks, held takes the other 10 for its whole prompt; when plain needs
    # an 8th block while held is still prefilling, plain (not held) is preempted.
    assert eng.stats().num_preemptions > 0
    assert len(tables) == 1 and len(next(iter(tables))) == 10   # allocated once, whole prompt
    assert got == want
    assert eng.stats().kv_blocks_in_use == 0
