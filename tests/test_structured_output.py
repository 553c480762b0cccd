"""Structured output inside the engine: a request's grammar masks every token it samples,
so the output parses and validates (JSON schemas with nested objects, enums, arrays,
required fields; regex; choice), greedy and seeded, on the embedded SmolLM2 model. The
grammar is rebuilt from the output so far: a request resumed as prompt + output
(resumed_output_tokens, a migration) or decoding after another engine's first token
continues the same structure. Invalid specs are refused naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from transformers import AutoTokenizer

from splitserve.config import EngineConfig
from splitserve.engine.errors import RequestError
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.types import FinishReason, SamplingParams
from splitserve.structured_output import StructuredOutput, StructuredOutputError

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1,
             "maxItems": 3}}, "required": ["name", "age", "address", "role", "tags"]}
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7},
             "maxItems": 3}}, "required": ["city", "unit", "days"]}
SCHEMAS = [PERSON, WEATHER, {"type": "object", "properties": {"ok": {"type": "boolean"}},
                             "required": ["ok"]}]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def eng(smollm2_dir):
    e = LLMEngine(EngineConfig(model=None, max_model_len=1024))
    yield e
    assert e.stats().kv_blocks_in_use == 0


def _chat(tok, text: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _run(eng, prompt, params) -> tuple[list[int], FinishReason]:
    rid = f"so-{eng._arrivals}"
    eng.add_request(rid, prompt, params)
    tokens, reason = [], None
    while reason is None:
        for out in eng.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
                reason = out.finish_reason if out.finished else None
    return tokens, reason


def _text(tok, tokens) -> str:
    return tok.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=7)])
def test_output_validates_against_the_schema(eng, tok, schema, sampling):
    params = SamplingParams(max_tokens=200, structured=StructuredOutput.json_schema(schema), **sampling)
    tokens, reason = _run(eng, _chat(tok, "Describe a person as JSON."), params)
    assert reason is FinishReason.STOP     # the grammar let EOS through once the JSON was whole
    jsonschema.validate(json.loads(_text(tok, tokens)), schema)


def test_json_object_regex_and_choice(eng, tok):
    prompt = _chat(tok, "Say something.")
    obj, _ = _run(eng, prompt, SamplingParams(max_tokens=100, temperature=0,
                                              structured=StructuredOutput("json_object")))
    assert isinstance(json.loads(_text(tok, obj)), dict)
    rx, _ = _run(eng, prompt, SamplingParams(max_tokens=40, temperature=0, structured=StructuredOutput(
        "regex", r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)")))
    assert re.fullmatch(r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)", _text(tok, rx))
    ch, _ = _run(eng, prompt, SamplingParams(max_tokens=10, temperature=0.7, seed=3,
                                             structured=StructuredOutput.choice(["yes", "no", "maybe"])))
    assert _text(tok, ch) in ("yes", "no", "maybe")


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=5)])
def test_a_resumed_request_continues_the_same_structure(eng, tok, sampling):
    """As a migration re-sends it: prompt + output so far, resumed_output_tokens = its
    length. The grammar consumes those tokens first; the rest equals the undisturbed run
    (a first token from another engine is the case k = 1)."""
    prompt = _chat(tok, "Describe a person as JSON.")
    so = StructuredOutput.json_schema(PERSON)
    whole, _ = _run(eng, prompt, SamplingParams(max_tokens=200, structured=so, **sampling))
    for k in (1, 9):
        rest, _ = _run(eng, prompt + whole[:k], SamplingParams(
            max_tokens=200 - k, structured=so, resumed_output_tokens=k, **sampling))
        assert whole[:k] + rest == whole


def test_output_that_breaks_the_grammar_fails_only_that_request(eng, tok):
    prompt = _chat(tok, "Hi")
    bad = tok.encode("hello", add_special_tokens=False)   # not JSON: the grammar refuses it
    _, reason = _run(eng, prompt + bad, SamplingParams(
        max_tokens=20, structured=StructuredOutput("json_object"), resumed_output_tokens=len(bad)))
    assert reason is FinishReason.ERROR


@pytest.mark.parametrize("so, param", [
    (StructuredOutput("json_schema", '{"type":"foo"}'), "response_format"),
    (StructuredOutput("regex", "(abc", "guided_regex"), "guided_regex"),
    (StructuredOutput("grammar", 'root ::= ("a"', "guided_grammar"), "guided_grammar"),
])
def test_an_invalid_spec_is_refused_naming_the_field(eng, tok, so, param):
    with pytest.raises(RequestError) as e:
        eng.add_request("bad", _chat(tok, "Hi"), SamplingParams(structured=so))
    assert e.value.param == param
    assert "bad" not in eng._requests


def test_a_spec_must_be_canonical_and_of_a_known_kind():
    with pytest.raises(StructuredOutputError):
        StructuredOutput("json_schema", '{"type": "object"}')     # not canonical
    with pytest.raises(StructuredOutputError):
        StructuredOutput("yaml", "a: 1")
    with pytest.raises(StructuredOutputError):
        StructuredOutput("choice", "[]")


def test_compiled_grammars_are_cached_and_bounded(smollm2_dir):
    from splitserve.engine.grammar import GrammarCache

    cache = GrammarCache(smollm2_dir, 49152, (2,), capacity=2)
    a, b, c = (StructuredOutput.json_schema({"type": "integer", "maximum": i}) for i in range(3))
    assert cache.compile(a) is cache.compile(a)
    cache.compile(b)
    cache.compile(c)
    assert len(cache) == 2


def test_strings_hold_no_raw_control_characters(smollm2_dir):
    """JSON forbids raw control characters in strings; xgrammar 0.2.8 lets them into
    strings with a length bound unless the engine tightens its grammar."""
    import xgrammar as xgr

    from splitserve.engine.grammar import GrammarCache

    cache = GrammarCache(smollm2_dir, 49152, (2,))
    so = StructuredOutput.json_schema({"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 8}, "b": {"type": "string"}}, "required": ["a", "b"]})
    for bad in ('{"a": "x\x0b', '{"a": "x", "b": "y\x08'):
        assert not xgr.GrammarMatcher(cache.compile(so)).accept_string(bad)
    assert xgr.GrammarMatcher(cache.compile(so)).accept_string('{"a": "x y", "b": "z"}')
