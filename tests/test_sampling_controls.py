"""The sampling controls vLLM users pass, with vLLM's formulas: presence, frequency and
repetition penalties, logit_bias, min_tokens with stop_token_ids. Greedy outputs are
checked against transformers' logits with the formulas applied independently here."""

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


def _reference(model_dir, prompt, n, presence=0.0, frequency=0.0, repetition=1.0, bias=()):
    """Greedy decoding with vLLM's penalties applied to transformers' logits."""
    model, ids, out = hf_model(str(model_dir)), list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            row = model(torch.tensor([ids])).logits[0, -1].float().clone()
            for t, b in bias:
                row[t] += b
            for t in set(ids):
                row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
            for t in set(out):
                row[t] -= frequency * out.count(t) + presence
            tok = int(row.argmax())
            ids.append(tok)
            out.append(tok)
    return out


@pytest.mark.parametrize("controls", [
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(repetition_penalty=1.8),
    dict(presence_penalty=-0.5, frequency_penalty=0.7, repetition_penalty=1.3,
         logit_bias=((5, 3.0), (77, -100.0))),
])
def test_penalties_and_bias_follow_vllms_formulas(eng, tiny_llama_dir, controls):
    prompt = random_prompt(24, seed=41)
    got = eng.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                **controls))[0]
    want = _reference(tiny_llama_dir, prompt, 16, controls.get("presence_penalty", 0.0),
                      controls.get("frequency_penalty", 0.0), controls.get("repetition_penalty", 1.0),
                      controls.get("logit_bias", ()))
    assert got == want
    plain = eng.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert got != plain        # the control really changed something


def test_a_large_logit_bias_forces_a_token(eng):
    out = eng.generate([random_prompt(10, seed=42)],
                       SamplingParams(max_tokens=5, temperature=1.0, logit_bias=((123, 100.0),)))[0]
    assert out == [123] * 5


def test_min_tokens_holds_back_stop_tokens(eng):
    prompt = random_prompt(20, seed=43)
    first = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0][0]
    assert eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                 stop_token_ids=(first,)))[0] == [first]
    held = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(first,),
                                                 min_tokens=3))[0]
    assert first not in held[:3] and len(held) >= 3


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
    ("repetition_penalty", float("inf")), ("presence_penalty", float("nan")), ("logit_bias", ((1, 101.0),)), ("logit_bias", ((-1, 1.0),)),
    ("min_tokens", 17), ("min_tokens", -1),
])
def test_out_of_range_controls_name_the_parameter(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(max_tokens=16, **{field: value})
    assert e.value.param == field


def test_a_logit_bias_outside_the_vocabulary_is_refused_naming_it(eng):
    from splitserve.engine.errors import RequestError

    with pytest.raises(RequestError) as e:
        eng.add_request("bias", [1, 2], SamplingParams(logit_bias=((10**6, 1.0),)))
    assert e.value.param == "logit_bias"


def test_penalties_resumed_after_a_migration_continue_identically(eng):
    # A migrated request is re-sent as prompt + output so far; resumed_output_tokens keeps
    # those tokens counted as output, and min_tokens shrinks by as many.
    prompt = random_prompt(30, seed=44)
    params = dict(temperature=0.9, seed=8, frequency_penalty=1.2, presence_penalty=0.5,
                  repetition_penalty=1.1, ignore_eos=True)
    full = eng.generate([prompt], SamplingParams(max_tokens=20, **params))[0]
    rest = eng.generate([prompt + full[:7]], SamplingParams(max_tokens=13, resumed_output_tokens=7,
                                                            **params))[0]
    assert rest == full[7:]
