"""What a request's output must look like (structured output), as one typed value that
travels inside the sampling parameters across every process boundary: frontend ->
decode worker -> the prefill worker that samples the first token, and a migrated
request's next worker. Each engine turns it into a token mask (engine/grammar.py).

kinds (OpenAI's response_format and tool_choice, plus vLLM's guided_* extras):
- json_object: a JSON object, any keys (spec is empty).
- json_schema: JSON that validates against the schema in `spec`.
- regex: text matching the regular expression `spec`.
- choice: exactly one of the strings in `spec` (a JSON list of strings).
- grammar: text of the EBNF grammar `spec` (xgrammar's GBNF dialect, as vLLM's guided_grammar).

`spec` is canonical text (JSON written compactly, keys in their given order: a schema's
property order is the order the output writes them), so equal requests share one
compiled grammar in every worker's cache.

A leaf module: it imports nothing from splitserve.
"""

from __future__ import annotations

import json

import msgspec

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# A schema is a page of JSON, not a document: bounds what a worker is asked to compile.
MAX_SPEC_CHARS = 256 * 1024


class StructuredOutputError(ValueError):
    """An invalid structured output request; `param` names the API field it came from."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


def compile_error_reason(e: Exception) -> str:
    """The reason in an error xgrammar raised, without its "[time] file.cc:line: " prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def canonical_json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class StructuredOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    kind: str
    spec: str = ""
    # The API field that asked for it: errors found later (a worker's compile) name it.
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError(f"structured output kind must be one of {KINDS}, got "
                                        f"{self.kind!r}", self.param)
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise StructuredOutputError(f"a structured output spec is a string of at most "
                                        f"{MAX_SPEC_CHARS} characters", self.param)
        if self.kind == "json_object":
            if self.spec:
                raise StructuredOutputError("json_object takes no spec", self.param)
            return
        if not self.spec:
            raise StructuredOutputError(f"{self.kind} needs a non-empty spec", self.param)
        if self.kind in ("json_schema", "choice"):
            try:
                value = json.loads(self.spec)
            except ValueError as e:
                raise StructuredOutputError(f"the {self.kind} spec is not JSON: {e}", self.param) from None
            if self.kind == "json_schema" and not isinstance(value, (dict, bool)):
                raise StructuredOutputError("a JSON schema must be an object", self.param)
            if self.kind == "choice" and (not isinstance(value, list) or not value or not all(
                    isinstance(v, str) for v in value)):
                raise StructuredOutputError("choice must be a non-empty list of strings", self.param)
            if canonical_json(value) != self.spec:
                raise StructuredOutputError(f"the {self.kind} spec must be canonical JSON "
                                            "(canonical_json)", self.param)

    @classmethod
    def json_schema(cls, schema, param: str = "response_format") -> "StructuredOutput":
        return cls("json_schema", canonical_json(schema), param)

    @classmethod
    def choice(cls, options: list[str], param: str = "guided_choice") -> "StructuredOutput":
        return cls("choice", canonical_json(options), param)
