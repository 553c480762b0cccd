"""Llama 3.x JSON tool calls (vLLM's `llama3_json` parser): the whole answer is one or
more `{"name": ..., "parameters": {...}}` objects separated by `;`, optionally after the
`<|python_tag|>` token. An answer that does not start that way is content. Streaming
holds an answer that starts with `{` until it ends, then decides."""

from __future__ import annotations

import json

from splitserve.frontend.tool_parsers.base import Parsed, ToolCall, ToolParser, call_from_json

PYTHON_TAG = "<|python_tag|>"


def _calls(text: str) -> list[ToolCall] | None:
    """Every call in text, or None when text is not exactly a `;`-separated list of calls."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            return None
        if (call := call_from_json(obj)) is None:
            return None
        calls.append(call)
        i = end
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return calls or None


class Llama3JsonToolParser(ToolParser):
    def __init__(self) -> None:
        self._buf = ""
        self._decided: bool | None = None    # True: may be calls (held); False: content

    def parse(self, text: str) -> Parsed:
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):]
        if body.startswith("{") and (calls := _calls(body)) is not None:
            return Parsed(None, calls)
        return Parsed(text, [])

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._decided is False:
            return text, []
        self._buf += text
        head = self._buf.lstrip()
        if not head or PYTHON_TAG.startswith(head):
            return "", []
        self._decided = head.startswith("{") or head.startswith(PYTHON_TAG)
        if self._decided:
            return "", []
        out, self._buf = self._buf, ""
        return out, []

    def flush(self) -> tuple[str, list[ToolCall]]:
        buf, self._buf = self._buf, ""
        parsed = self.parse(buf)
        return parsed.content or "", parsed.calls
