"""Tool calls out of a model's text, as vLLM's parsers read them: hermes (`<tool_call>`
tags) and llama3_json (bare JSON calls); whole and streamed in pieces of any size, the
stream giving the same content and calls. tool_choice validation and the grammars that
force a call."""

from __future__ import annotations

import json

import jsonschema
import pytest

from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.structured_request import check
from splitserve.frontend.tool_parsers import PARSERS
from splitserve.frontend.tools import (FunctionDefinition, NamedToolChoice, ToolDefinition,
                                       plan_tools, required_schema)

WEATHER = ToolDefinition(type="function", function=FunctionDefinition(
    name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}))
TIME = ToolDefinition(type="function", function=FunctionDefinition(name="get_time"))

HERMES = [
    ("Just text, no call.", "Just text, no call.", []),
    ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
     None, [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ('<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}', None, [("get_time", {"tz": "UTC"})]),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("a < b <tool", "a < b <tool", []),
]
LLAMA3 = [
    ("The weather is nice.", "The weather is nice.", []),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}',
     None, [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ('<|python_tag|>{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    ('{"answer": 42}', '{"answer": 42}', []),
]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _streamed(parser, text: str, piece: int) -> tuple[str, list]:
    content, calls = [], []
    for i in range(0, len(text), piece):
        c, k = parser.feed(text[i:i + piece])
        content.append(c)
        calls += k
    c, k = parser.flush()
    return "".join(content) + c, calls + k


@pytest.mark.parametrize("name, cases", [("hermes", HERMES), ("llama3_json", LLAMA3)])
def test_parsers_read_calls_whole_and_streamed(name, cases):
    for text, content, calls in cases:
        parsed = PARSERS[name]().parse(text)
        assert (parsed.content, _calls(parsed.calls)) == (content, calls), text
        for piece in (1, 3, 7, len(text)):
            got_content, got_calls = _streamed(PARSERS[name](), text, piece)
            assert got_content.strip() == (content or "").strip(), (text, piece)
            assert _calls(got_calls) == calls, (text, piece)


def test_each_call_gets_its_own_id():
    parsed = PARSERS["hermes"]().parse(HERMES[2][0])
    assert len({c.id for c in parsed.calls}) == 2
    assert all(c.to_json()["type"] == "function" for c in parsed.calls)


def test_tool_choice_is_checked_against_the_tools():
    with pytest.raises(OpenAIError) as e:
        plan_tools([WEATHER], NamedToolChoice.model_validate(
            {"type": "function", "function": {"name": "nope"}}), "hermes", True)
    assert e.value.status == 400 and e.value.param == "tool_choice"
    with pytest.raises(OpenAIError) as e:
        plan_tools(None, "required", "hermes", True)
    assert e.value.param == "tool_choice"
    with pytest.raises(OpenAIError) as e:   # auto (the default) without the server's flags
        plan_tools([WEATHER], None, None, False)
    assert e.value.param == "tool_choice"
    with pytest.raises(OpenAIError) as e:
        plan_tools([WEATHER, WEATHER], "required", None, False)
    assert e.value.param == "tools"
    with pytest.raises(OpenAIError) as e:   # a forced call whose parameters are no schema
        check(plan_tools([ToolDefinition(type="function", function=FunctionDefinition(
            name="f", parameters={"type": "nope"}))], "required", None, False).structure())
    assert e.value.param == "tools"
    assert plan_tools(None, "none", None, False) is None
    assert plan_tools([WEATHER], "none", None, False).structure() is None


def test_forced_choices_have_the_calls_schema():
    named = plan_tools([WEATHER, TIME], NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "get_weather"}}), None, False)
    assert json.loads(named.structure().spec) == WEATHER.function.parameters
    schema = required_schema([WEATHER, TIME])
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Lima"}},
                         {"name": "get_time", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {}}], schema)
    out = plan_tools([WEATHER, TIME], "required", None, False).output()
    parsed = out.parse('[{"name": "get_time", "parameters": {}}]')
    assert (parsed.content, _calls(parsed.calls)) == (None, [("get_time", {})])
