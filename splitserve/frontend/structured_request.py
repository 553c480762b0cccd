"""A request's structured output, from the OpenAI body: `response_format` (json_object,
json_schema) or vLLM's guided_json / guided_regex / guided_choice / guided_grammar
extras, or a tool_choice that forces a call (tools.py). At most one of them.

The spec is checked (check()) before any work reaches a worker: xgrammar parses the
schema, regex or grammar without a tokenizer (milliseconds, but importing xgrammar the
first time takes seconds: callers run it on a thread), so an invalid one is a 400 naming
the parameter. The workers compile it for their tokenizer (engine/grammar.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from splitserve.frontend.errors import bad_request
from splitserve.structured_output import (StructuredOutput, StructuredOutputError, canonical_json,
                                          compile_error_reason)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, populate_by_name=True)


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow BaseModel.schema(); the JSON key is still "schema".
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    # OpenAI's strict=true is what every schema gets here: output always validates.
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def check(so: StructuredOutput) -> StructuredOutput:
    """so, once xgrammar can parse its spec; else a 400 naming so.param."""
    import xgrammar as xgr  # slow import: the first structured request pays it, not start-up

    try:
        if so.kind == "json_schema":
            xgr.Grammar.from_json_schema(so.spec, any_whitespace=False, strict_mode=True)
        elif so.kind == "regex":
            xgr.Grammar.from_regex(so.spec)
        elif so.kind == "grammar":
            xgr.Grammar.from_ebnf(so.spec)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with the reason
        raise bad_request(f"invalid {so.param}: {compile_error_reason(e)}", so.param) from None
    return so


def _build(kind: str, spec: str, param: str) -> StructuredOutput:
    try:
        return StructuredOutput(kind, spec, param)
    except StructuredOutputError as e:
        raise bad_request(f"invalid {param}: {e}", param) from None


def requested_structure(body) -> StructuredOutput | None:
    """The structure a request body (openai_protocol: response_format, guided_*) asks for
    (None: free text), not yet check()ed; a 400 when it is malformed or when two fields
    ask for one."""
    asked: list[StructuredOutput] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(_build("json_object", "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request("response_format of type json_schema needs a 'json_schema' object "
                              "with a 'name' and a 'schema'", "response_format")
        asked.append(_build("json_schema", canonical_json(rf.json_schema.schema_), "response_format"))
    if body.guided_json is not None:
        spec = body.guided_json
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise bad_request(f"invalid guided_json: not JSON: {e}", "guided_json") from None
        asked.append(_build("json_schema", canonical_json(spec), "guided_json"))
    if body.guided_regex is not None:
        asked.append(_build("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        asked.append(_build("choice", canonical_json(body.guided_choice), "guided_choice"))
    if body.guided_grammar is not None:
        asked.append(_build("grammar", body.guided_grammar, "guided_grammar"))
    if len(asked) > 1:
        raise bad_request(f"only one kind of structured output per request; got "
                          f"{', '.join(a.param for a in asked)}", asked[1].param)
    return asked[0] if asked else None

