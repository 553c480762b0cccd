"""What a tool-call parser (`--tool-call-parser`) is: how one model family writes tool
calls into its text, and how to take them back out, whole or while streaming.

A parser sees the text of one chat choice (the detokenizer's output, special tokens
skipped). Streaming is conservative: text that may still turn into a tool call is held
back until it is known; a call is emitted once its JSON is complete (name first, then its
arguments, as two deltas of the same index).
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; arguments is a JSON text (OpenAI's `function.arguments`)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_json(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    """content: the text that is not a tool call (None when there is none)."""

    content: str | None
    calls: list[ToolCall]


def call_from_json(obj, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A call from a decoded {"name": ..., "arguments"|"parameters": {...}} object; None
    when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in arguments_keys if k in obj), {})
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    """One choice's parser: parse() for a whole answer; feed()/flush() for a stream."""

    @abstractmethod
    def parse(self, text: str) -> Parsed:
        """The whole answer's content and calls."""

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Streaming: the content that is certain now, and the calls completed by `text`."""

    @abstractmethod
    def flush(self) -> tuple[str, list[ToolCall]]:
        """The stream ended: what was held back, as content or calls."""
