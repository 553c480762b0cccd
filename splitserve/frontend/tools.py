"""Tools (function calling) on chat completions, as vLLM serves them.

- The request: `tools` (functions with JSON-schema parameters) and `tool_choice`; the
  tools are rendered by the model's chat template (apply_chat_template(tools=...)), and
  messages may carry the conversation's earlier calls (assistant `tool_calls`) and their
  results (role `tool`).
- tool_choice decides what the output is (ToolPlan):
  - "none": text; no calls are looked for.
  - "auto" (the default when tools are given): the model decides; its text is parsed
    by the `--tool-call-parser` for its family, which needs `--enable-auto-tool-choice`.
  - "required": the grammar forces a JSON list of one or more {"name", "parameters"}
    calls of the given tools (vLLM's schema).
  - {"type": "function", "function": {"name": N}}: the grammar forces N's arguments.
- Each choice's output becomes `message.tool_calls` (or `delta.tool_calls` chunks: a
  call's id and name first, then its arguments) and finish_reason "tool_calls".
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from splitserve.frontend.errors import bad_request
from splitserve.frontend.structured_request import check, requested_structure
from splitserve.frontend.tool_parsers import PARSERS, Parsed, ToolCall, ToolParser
from splitserve.structured_output import StructuredOutput

# OpenAI's rule for function names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class FunctionDefinition(_Body):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Body):
    name: str
    arguments: str


class MessageToolCall(_Body):
    """An earlier call in the conversation (an assistant message's tool_calls)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


def template_message(role: str, content: str, tool_calls: list[MessageToolCall] | None,
                     tool_call_id: str | None, name: str | None) -> dict:
    """A message as chat templates read it. Arguments become objects: templates write
    them with `| tojson` (Hermes, Qwen, Llama 3), as vLLM hands them over."""
    msg: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _as_object(c.function.arguments)}}
            for c in tool_calls]
    if tool_call_id is not None:
        msg["tool_call_id"] = tool_call_id
    if name is not None:
        msg["name"] = name
    return msg


def _as_object(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments    # not JSON: the template gets the text as it was sent


def template_tools(tools: list[ToolDefinition] | None) -> list[dict] | None:
    return None if not tools else [t.model_dump(exclude_none=True) for t in tools]


@dataclass(frozen=True)
class ToolPlan:
    """mode: none | auto | required | named; parser: the auto mode's parser name."""

    mode: str
    tools: tuple[ToolDefinition, ...]
    named: str | None = None
    parser: str | None = None

    def structure(self) -> StructuredOutput | None:
        """The grammar a forced choice needs (None for none/auto); built from the tools'
        parameters, so a schema xgrammar refuses is (once check()ed) a 400 naming `tools`."""
        if self.mode == "named":
            fn = next(t.function for t in self.tools if t.function.name == self.named)
            return StructuredOutput.json_schema(_parameters(fn), "tools")
        if self.mode == "required":
            return StructuredOutput.json_schema(required_schema(self.tools), "tools")
        return None

    def output(self) -> "ToolOutput | None":
        """One choice's tool-call extractor (None: the output is plain content)."""
        if self.mode == "none":
            return None
        if self.mode == "auto":
            return ToolOutput(self, PARSERS[self.parser]())
        return ToolOutput(self, None)


def _parameters(fn: FunctionDefinition) -> dict:
    return fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}


def required_schema(tools) -> dict:
    """vLLM's schema for tool_choice "required": a list of one or more calls."""
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [t.function.name]},
                        "parameters": _parameters(t.function)},
         "required": ["name", "parameters"]} for t in tools]}}


def plan_tools(tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None,
               parser: str | None, auto_enabled: bool) -> ToolPlan | None:
    """The request's tool plan (None: no tools); a 400 naming tools or tool_choice."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is "
                              f"not among the tools ({', '.join(names)})", "tool_choice")
        return ToolPlan("named", tuple(tools), named=choice.function.name)
    if choice == "auto" and (parser is None or not auto_enabled):
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and '
                          '--tool-call-parser to be set', "tool_choice")
    return ToolPlan(choice, tuple(tools), parser=parser)


class ToolOutput:
    """One choice's calls, from its content text. Forced choices parse the grammar's JSON;
    auto asks the family's parser. Streaming: feed()/flush() give (content, call deltas)."""

    def __init__(self, plan: ToolPlan, parser: ToolParser | None):
        self._plan = plan
        self._parser = parser
        self._buf = ""
        self._named: ToolCall | None = None
        self.num_calls = 0

    def parse(self, text: str) -> Parsed:
        if self._parser is not None:
            parsed = self._parser.parse(text)
        elif self._plan.mode == "named":
            parsed = Parsed(None, [ToolCall(self._plan.named, text)])
        else:
            calls = _required_calls(text)
            parsed = Parsed(None, calls) if calls else Parsed(text, [])
        self.num_calls = len(parsed.calls)
        return parsed

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if self._parser is not None:
            content, calls = self._parser.feed(text)
            return content, self._deltas(calls)
        if self._plan.mode == "named":
            # The output is the arguments themselves: they stream as they come.
            deltas = []
            if self._named is None:
                self._named = ToolCall(self._plan.named, "")
                deltas = self._deltas([self._named])
            if text:
                deltas.append({"index": 0, "function": {"arguments": text}})
            return "", deltas
        self._buf += text
        return "", []

    def flush(self) -> tuple[str, list[dict]]:
        if self._parser is not None:
            content, calls = self._parser.flush()
            return content, self._deltas(calls)
        if self._plan.mode == "named":
            return "", []
        buf, self._buf = self._buf, ""
        calls = _required_calls(buf)
        return ("", self._deltas(calls)) if calls else (buf, [])

    def _deltas(self, calls: list[ToolCall]) -> list[dict]:
        """A call's two deltas: its id and name (arguments empty), then its arguments."""
        out = []
        for call in calls:
            i, self.num_calls = self.num_calls, self.num_calls + 1
            out.append({"index": i, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}})
            if call.arguments:
                out.append({"index": i, "function": {"arguments": call.arguments}})
        return out


def _required_calls(text: str) -> list[ToolCall]:
    try:
        items = json.loads(text)
    except ValueError:
        return []       # cut short (max_tokens): no call, the text is returned as content
    if not isinstance(items, list):
        return []
    return [ToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
            for c in items if isinstance(c, dict) and isinstance(c.get("name"), str)]


async def plan_request(body, chat: bool, parser: str | None,
                       auto_enabled: bool) -> tuple[StructuredOutput | None, ToolPlan | None]:
    """A request body's structured output (response_format, guided_*, or a forced tool
    call's schema), checked on a thread, and its tool plan (chat only); a 400 naming the
    parameter."""
    structure = requested_structure(body)
    plan = plan_tools(body.tools, body.tool_choice, parser, auto_enabled) if chat else None
    forced = plan.structure() if plan is not None else None
    if forced is not None and structure is not None:
        raise bad_request(f"{structure.param} cannot be combined with a tool_choice that forces a "
                          "call", structure.param)
    structure = forced or structure
    if structure is not None:
        await asyncio.to_thread(check, structure)
    return structure, plan
