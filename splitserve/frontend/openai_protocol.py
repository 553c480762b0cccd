"""Request bodies of the OpenAI API subset we serve, validated with pydantic.

Unknown fields are accepted and ignored (as OpenAI and vLLM do: SDKs send fields such as
`user`), but fields that would change the answer and that we do not implement are refused
by `unsupported()` with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def unsupported(self) -> str | None:
        """Name of a field set to a value we cannot honour, if any."""
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "response_format"):
            if extra.get(name) not in (None, False, [], 0):
                return name
        if extra.get("best_of") not in (None, 1):
            return "best_of"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Content as one string; text parts are joined with newlines (as vLLM does)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
