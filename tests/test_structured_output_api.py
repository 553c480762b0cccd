"""Structured output and tools through the OpenAI API with the official SDK, on the
embedded SmolLM2 model in `serve --aggregated` and `serve` (disaggregated: the prefill
worker samples the first token under the same grammar):

- response_format json_schema / json_object: the output parses and validates, streamed
  and not, greedy and seeded, the same text in both modes;
- a tool-call round trip: the model calls a tool (tool_choice required, or a named
  function), the client sends the result (a `tool` message after the assistant's
  `tool_calls`), the model answers; calls streamed as delta.tool_calls equal the whole
  response's; the same calls and answer in both modes;
- bad input is a 400 naming the parameter.

The model's directory gets a Hermes-style chat template (ChatML with <tools>,
<tool_call> and <tool_response>, as Qwen2.5's), so the template renders the tools and
the conversation's calls; `--tool-call-parser hermes --enable-auto-tool-choice`.
"""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest

from live_server import start_serve

# Slow (clusters (aggregated and 1P+1D) per test module: minutes on 2 cores): run by
# `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

You may call functions. Their signatures are within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call, answer with a JSON object within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role != 'system' %}<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first and tools %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

ARGS = ("--max-model-len", "2048", "--served-model-name", "smol", "--tool-call-parser", "hermes",
        "--enable-auto-tool-choice")
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                "required": ["city"]},
    "role": {"enum": ["admin", "user", "guest"]},
    "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["name", "age", "address", "role", "skills"]}
WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 24}},
                                               "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("smol-tools")
    for f in smollm2_dir.iterdir():
        if f.name == "model.safetensors":
            (path / f.name).symlink_to(f)
        elif f.name != "chat_template.jinja":
            shutil.copy(f, path / f.name)
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    agg = start_serve(model_dir, tmp_path_factory.mktemp("so-agg"), *ARGS, "--aggregated")
    try:
        disagg = start_serve(model_dir, tmp_path_factory.mktemp("so-disagg"), *ARGS)
    except BaseException:
        agg.stop()
        raise
    yield agg, disagg
    for srv in (agg, disagg):
        for url in srv.worker_urls:
            assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=url) == 0
        assert srv.stop() == 0


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)


def _chat(srv, messages, stream=False, **kw):
    with _client(srv) as c:
        if not stream:
            r = c.chat.completions.create(model="smol", messages=messages, **kw)
            m = r.choices[0].message
            calls = [(t.function.name, t.function.arguments) for t in m.tool_calls or []]
            return m.content, calls, r.choices[0].finish_reason, [t.id for t in m.tool_calls or []]
        content, calls, reason = [], {}, None
        for chunk in c.chat.completions.create(model="smol", messages=messages, stream=True, **kw):
            for ch in chunk.choices:
                content.append(ch.delta.content or "")
                for t in ch.delta.tool_calls or []:
                    if t.index not in calls:     # a call's first delta names it
                        assert t.id and t.function.name
                        calls[t.index] = [t.function.name, "", t.id]
                    calls[t.index][1] += t.function.arguments or ""
                reason = ch.finish_reason or reason
        return ("".join(content) or None, [(n, a) for n, a, _ in calls.values()], reason,
                [i for _, _, i in calls.values()])


SAMPLING = [dict(temperature=0), dict(temperature=0.8, seed=42)]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_json_schema_output_validates_and_is_the_same_in_both_modes(servers, sampling):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON."}]
    outs = [_chat(srv, msgs, stream=s, response_format=fmt, max_tokens=300, **sampling)
            for srv in servers for s in (False, True)]
    assert all(o[:3] == outs[0][:3] for o in outs), outs
    content, calls, reason, _ = outs[0]
    assert reason == "stop" and not calls
    jsonschema.validate(json.loads(content), PERSON)


def test_json_object_output_is_an_object(servers):
    for srv in servers:
        content, _, reason, _ = _chat(srv, [{"role": "user", "content": "Give me a JSON object."}],
                                      response_format={"type": "json_object"}, max_tokens=200,
                                      temperature=0)
        assert reason == "stop" and isinstance(json.loads(content), dict)
    with _client(servers[0]) as c:     # completions take response_format too
        done = c.completions.create(model="smol", prompt="A JSON object:", max_tokens=200, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(done.choices[0].text), dict)
    content, *_ = _chat(servers[1], [{"role": "user", "content": "Is the sky blue?"}], max_tokens=10,
                        temperature=0.7, seed=1, extra_body={"guided_choice": ["yes", "no", "unsure"]})
    assert content in ("yes", "no", "unsure")


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_call_round_trip(servers, tool_choice):
    results = []
    for srv in servers:
        content, calls, reason, ids = _chat(srv, ASK, tools=TOOLS, tool_choice=tool_choice,
                                            max_tokens=200, temperature=0)
        assert _chat(srv, ASK, stream=True, tools=TOOLS, tool_choice=tool_choice, max_tokens=200,
                     temperature=0)[:3] == (content, calls, reason)
        assert reason == "tool_calls" and content is None and calls
        for name, arguments in calls:
            params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
            jsonschema.validate(json.loads(arguments), params)
        if isinstance(tool_choice, dict):
            assert [n for n, _ in calls] == ["get_weather"]
        # The client runs the tools and sends their results back.
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in zip(ids, calls)]}] + [
            {"role": "tool", "tool_call_id": i, "content": json.dumps({"temperature": 21, "sky": "clear"})}
            for i in ids]
        answer, more, end, _ = _chat(srv, history, tools=TOOLS, tool_choice="none", max_tokens=40,
                                     temperature=0)
        assert answer and not more and end in ("stop", "length")
        results.append((calls, answer))
    assert results[0] == results[1]      # greedy: aggregated == disaggregated


def test_auto_tool_choice_gives_content_or_parsed_calls(servers):
    content, calls, reason, _ = _chat(servers[0], ASK, tools=TOOLS, max_tokens=60, temperature=0)
    assert _chat(servers[0], ASK, stream=True, tools=TOOLS, max_tokens=60,
                 temperature=0)[:3] == (content, calls, reason)
    assert (reason == "tool_calls") == bool(calls)
    assert content or calls
    assert "<tool_call>" not in (content or "")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"n": 0}, "n"),
])
def test_bad_input_is_a_400_naming_the_parameter(servers, body, param):
    resp = httpx.post(f"{servers[1].base_url}/v1/chat/completions", timeout=30,
                      json={"model": "smol", "messages": ASK, "max_tokens": 5, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
