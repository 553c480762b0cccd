"""Request bodies of the OpenAI API subset we serve, validated with pydantic.

Unknown fields are accepted and ignored (as OpenAI and vLLM do: SDKs send fields such as
`user`), but fields that would change the answer and that we do not implement are refused
by `unsupported()` with a 400 naming them, never silently ignored.

Types are strict, as OpenAI's API is: a boolean is not a number, a string is neither a
boolean nor a number (`"stream": "yes"` is a 400), and a number may be a float where a
float is expected. NaN and infinities are refused. Values the engine would choke on
(seeds outside torch's range, token ids beyond any vocabulary) are bounded here so they
never travel further than the frontend.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from splitserve.engine.types import MAX_LOGPROBS, MAX_TOKEN_ID, SEED_MAX, SEED_MIN
from splitserve.frontend.structured_request import ResponseFormat
from splitserve.frontend.tools import MessageToolCall, ToolChoice, ToolDefinition

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
# OpenAI's chat roles; a 'tool' message carries a tool call's result (tools.py).
ROLES = ("system", "developer", "user", "assistant", "tool")


class _Strict(BaseModel):
    # extra="allow": unknown fields are ignored (see unsupported()), but validated as JSON.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in value)


def _check_prompt(value: Any) -> Any:
    """A string, a list of strings, a list of token ids or a list of token-id lists."""
    if isinstance(value, str) or _is_token_ids(value):
        return value
    if isinstance(value, list) and (all(isinstance(v, str) for v in value)
                                    or all(_is_token_ids(v) for v in value)):
        return value
    raise PydanticCustomError(
        "prompt_type", "must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists (token ids are integers in [0, {max}])", {"max": MAX_TOKEN_ID})


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise PydanticCustomError("stop_type", "must be a string or a list of strings")


def _check_content(value: Any) -> Any:
    """A string, null, or a list of text parts ({"type": "text", "text": "..."})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PydanticCustomError("content_part", "only text content parts are supported, "
                                          "got {kind}", {"kind": repr(kind)})
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("content_part", "a text content part needs a string 'text'")
        return value
    raise PydanticCustomError("content_type", "must be a string, null or a list of text parts")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    # vLLM's bounds: what torch.Generator accepts.
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: Annotated[Any, AfterValidator(_check_stop)] = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    # vLLM's sampling controls (ranges checked by SamplingParams, 400 naming the field).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    n: int = 1
    # Structured output (structured_request.py): OpenAI's and vLLM's guided_* extras.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def unsupported(self) -> str | None:
        """Name of a field set to a value we cannot honour, if any."""
        extra = self.model_extra or {}
        # Completions declare echo and best_of (completion_options.py); a chat request
        # carrying them asks for something chat does not have.
        for name in ("echo", "suffix"):
            if extra.get(name) not in (None, False, [], 0):
                return name
        if extra.get("best_of") not in (None, 1):
            return "best_of"
        return None

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...] | None:
        """logit_bias as (token id, bias) pairs; None when a key is not a token id."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isascii() or not key.isdigit():
                return None
            pairs.append((int(key), bias))
        return tuple(sorted(pairs))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(_Strict):
    role: Literal[ROLES]
    content: Annotated[Any, AfterValidator(_check_content)] = None
    tool_calls: list[MessageToolCall] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = None                   # a tool message: which call it answers
    name: str | None = None

    def text(self) -> str:
        """Content as one string; text parts are joined with newlines (as vLLM does)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part["text"] for part in self.content)

    def num_chars(self) -> int:
        if isinstance(self.content, list):
            return sum(len(part["text"]) for part in self.content)
        return len(self.content or "")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None

    def requested_logprobs(self) -> int | None:
        """How many top logprobs per token (0: the sampled token's only); None: none."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt_size(self) -> int:
        """Characters (or token ids) to turn into prompt tokens: how costly that will be."""
        return sum(m.num_chars() for m in self.messages)


class CompletionRequest(_SamplingFields):
    prompt: Annotated[Any, AfterValidator(_check_prompt)]
    # OpenAI allows 0-5; vLLM (and we) up to its --max-logprobs default, 20.
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: int | None = None

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_size(self) -> int:
        if isinstance(self.prompt, str):
            return len(self.prompt)
        return sum(len(p) if isinstance(p, (str, list)) else 1 for p in self.prompt)
