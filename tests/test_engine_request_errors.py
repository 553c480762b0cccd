"""One request cannot take the engine down: sampling parameters are checked whatever sent
them, a tiny temperature is greedy, and a request whose sampling fails (NaN logits, an
exception for its row) fails alone while the rest of its batch finishes unchanged."""

import asyncio
import math
import time

import httpx
import msgspec
import pytest

from golden import random_prompt
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine, RequestError
from splitserve.engine.sampler import Sampler
from splitserve.engine.types import FinishReason, SamplingError, SamplingParams
from splitserve.worker.async_engine import AsyncEngine, EngineState, RequestFailed

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def eng(tiny_llama_dir):
    e = LLMEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=512))
    yield e
    assert e.stats().kv_blocks_in_use == 0


def run_all(eng) -> dict:
    """Step until idle; request id -> (tokens, finish reason, error)."""
    got: dict = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens, _, _ = got.get(out.request_id, ([], None, None))
            got[out.request_id] = (tokens + out.new_token_ids, out.finish_reason, out.error)
    return got


def poison(monkeypatch, eng, victim: SamplingParams, after: int = 0, how: str = "nan"):
    """From the victim's `after`-th sampled token on, its row's logits are NaN (how="nan")
    or sampling its row raises (how="raise"). The victim is recognised by its params object."""
    seen = {"n": 0}
    sample, sample_row = eng.runner.sampler.sample, Sampler._sample_row

    def poisoned(logits, params, generators, **kw):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p is victim:
                seen["n"] += 1
                if how == "nan" and seen["n"] > after:
                    logits[i] = float("nan")
        return sample(logits, params, generators, **kw)

    def raising(logits, p, gen):
        if p is victim and seen["n"] > after:
            raise RuntimeError("injected sampler fault")
        return sample_row(logits, p, gen)

    monkeypatch.setattr(eng.runner.sampler, "sample", poisoned)
    if how == "raise":
        monkeypatch.setattr(Sampler, "_sample_row", staticmethod(raising))


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 9.9e-6])
def test_a_temperature_below_vllms_epsilon_is_greedy(eng, temperature):
    prompt = random_prompt(20, seed=3)
    greedy = eng.generate([prompt], GREEDY)[0]
    tiny = SamplingParams(max_tokens=12, temperature=temperature, top_p=0.5, top_k=3, ignore_eos=True)
    assert tiny.greedy and eng.generate([prompt], tiny)[0] == greedy


@pytest.mark.parametrize("kw, param", [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": 1.5e6}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_p": True}, "top_p"),
    ({"top_k": 2**40}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop_token_ids": ([1],)}, "stop_token_ids"),
    ({"stop_token_ids": [1]}, "stop_token_ids"),
    ({"stop_token_ids": (2**70,)}, "stop_token_ids"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ({"stop_token_ids": (True,)}, "stop_token_ids"),
    ({"stop_token_ids": tuple(range(1025))}, "stop_token_ids"),
    ({"max_tokens": True}, "max_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_sampling_params_refuse_what_the_engine_cannot_use(kw, param):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_bounds_themselves_are_accepted():
    SamplingParams(seed=2**63 - 1)
    SamplingParams(seed=-2**63, stop_token_ids=(0, 2**31 - 1), top_k=-1, temperature=1e6)


def test_stop_token_ids_outside_the_vocabulary_are_refused(eng):
    with pytest.raises(RequestError) as e:
        eng.add_request("stop-vocab", [1, 2, 3], SamplingParams(stop_token_ids=(2**31 - 1,)))
    assert e.value.param == "stop_token_ids"
    assert eng.stats().kv_blocks_in_use == 0


@pytest.mark.parametrize("how, victim_params, after", [
    ("nan", GREEDY, 0),      # its very first token (end of prefill)
    ("nan", SEEDED, 4),      # mid-decode, a random row
    ("raise", SEEDED, 2),    # any exception sampling its row
])
def test_a_request_whose_sampling_fails_fails_alone(eng, monkeypatch, how, victim_params, after):
    prompts = {name: random_prompt(n, seed=i) for i, (name, n) in enumerate([("a", 30), ("b", 70), ("v", 40)])}
    params = {"a": GREEDY, "b": SEEDED}
    for rid in ("a", "b"):
        eng.add_request(rid, prompts[rid], params[rid])
    undisturbed = run_all(eng)

    victim = msgspec.structs.replace(victim_params)  # a distinct object: poison() matches by identity
    poison(monkeypatch, eng, victim, after, how)
    for rid in ("a", "b"):
        eng.add_request(rid, prompts[rid], params[rid])
    eng.add_request("v", prompts["v"], victim)
    got = run_all(eng)

    assert got["a"] == undisturbed["a"] and got["b"] == undisturbed["b"]
    tokens, reason, error = got["v"]
    assert reason is FinishReason.ERROR and len(tokens) == after
    expected = "non-finite logits" if how == "nan" else "RuntimeError: injected sampler fault"
    assert expected in error
    assert eng.stats().kv_blocks_in_use == 0 and eng.stats().num_requests_running == 0
    monkeypatch.undo()
    # The engine goes on: the same prompt now completes.
    assert len(eng.generate([prompts["v"]], GREEDY)[0]) == GREEDY.max_tokens


def test_a_failed_held_prefill_announces_no_uncomputed_block(eng, monkeypatch):
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    poison(monkeypatch, eng, first)
    eng.add_request("held", random_prompt(100, seed=8), first, hold=True)
    outs = []
    while eng.has_unfinished_requests():
        outs.extend(eng.step())
    last = outs[-1]
    assert last.finished and last.finish_reason is FinishReason.ERROR and not last.new_token_ids
    # The step that failed computed the prompt, but its KV is not announced as final.
    assert last.kv_progress.num_ready_blocks == 0
    assert eng.stats().kv_blocks_in_use > 0     # pinned: the peer may still be reading
    eng.release("held")
    assert eng.stats().kv_blocks_in_use == 0


def test_the_async_engine_raises_request_failed_and_keeps_serving(eng, monkeypatch):
    victim = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    poison(monkeypatch, eng, victim, after=2)
    fatal: list[str] = []

    async def main():
        ae = AsyncEngine(lambda: eng, fatal.append)
        ae.start()
        try:
            while ae.state is not EngineState.READY:
                await asyncio.sleep(0.01)
            bad = await ae.add("bad", random_prompt(20, seed=4), victim)
            seen = []
            with pytest.raises(RequestFailed, match="non-finite logits"):
                async for out in bad:
                    seen.extend(out.new_token_ids)
            good = await ae.add("good", random_prompt(20, seed=4), GREEDY)
            tokens = [t async for out in good for t in out.new_token_ids]
            return seen, tokens, ae.state.value
        finally:
            ae.stop()

    seen, tokens, state = asyncio.run(main())
    assert len(seen) == 2 and len(tokens) == GREEDY.max_tokens and state == "ready" and not fatal


def test_over_http_the_failed_request_is_a_clear_error_and_the_worker_serves_on(eng, monkeypatch):
    from test_worker_loading import ThreadServer

    from splitserve.discovery import parse_discovery
    from splitserve.frontend.app import create_app as create_frontend
    from splitserve.worker.app import create_app as create_worker
    from splitserve.worker.config import WorkerConfig

    # The victim is whichever request asks for seed 4242 (the frontend builds its params).
    sample = eng.runner.sampler.sample

    def poisoned(logits, params, generators, **kw):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.seed == 4242:
                logits[i] = float("nan")
        return sample(logits, params, generators, **kw)

    monkeypatch.setattr(eng.runner.sampler, "sample", poisoned)
    fatal: list[str] = []
    worker = ThreadServer(create_worker(AsyncEngine(lambda: eng, fatal.append), WorkerConfig(), "both-0"))
    frontend = ThreadServer(create_frontend(parse_discovery(f"static:{worker.url}")))
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{frontend.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the frontend never became ready"
            time.sleep(0.05)
        body = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True}
        bad = httpx.post(f"{frontend.url}/v1/completions", json={**body, "seed": 4242}, timeout=60)
        assert bad.status_code == 503 and "non-finite logits" in bad.json()["error"]["message"]
        good = httpx.post(f"{frontend.url}/v1/completions", json={**body, "temperature": 0}, timeout=60)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(f"{worker.url}/health").json() == {"status": "ok"} and not fatal
        assert httpx.get(f"{worker.url}/stats").json()["kv_blocks_in_use"] == 0
    finally:
        frontend.stop()
        worker.stop()
