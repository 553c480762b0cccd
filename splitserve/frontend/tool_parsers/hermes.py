"""Hermes-style tool calls (Hermes 2 Pro/3, Qwen2.5/Qwen3; vLLM's `hermes` parser): each
call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, after any content.
A closing tag missing at the end of the output still counts (vLLM's rule)."""

from __future__ import annotations

import json
import re

from splitserve.frontend.tool_parsers.base import Parsed, ToolCall, ToolParser, call_from_json

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def _decode(body: str) -> ToolCall | None:
    try:
        return call_from_json(json.loads(body.strip()))
    except ValueError:
        return None


class HermesToolParser(ToolParser):
    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False

    def parse(self, text: str) -> Parsed:
        start = text.find(START)
        if start < 0:
            return Parsed(text, [])
        calls = [c for m in _CALL.finditer(text, start) if (c := _decode(m.group(1) or m.group(2) or ""))]
        if not calls:   # tags around no valid call: the model wrote text, show it
            return Parsed(text, [])
        return Parsed(text[:start] or None, calls)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = [], []
        while True:
            if not self._in_call:
                i = self._buf.find(START)
                if i < 0:
                    keep = _partial_suffix(self._buf, START)
                    content.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i])
                self._buf, self._in_call = self._buf[i + len(START):], True
            j = self._buf.find(END)
            if j < 0:
                break
            call = _decode(self._buf[:j])
            if call is None:    # not a call after all: the text goes out as it was
                content.append(START + self._buf[:j + len(END)])
            else:
                calls.append(call)
            self._buf, self._in_call = self._buf[j + len(END):], False
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        buf, in_call = self._buf, self._in_call
        self._buf, self._in_call = "", False
        if not in_call:
            return buf, []
        call = _decode(buf)
        return ("", [call]) if call is not None else (START + buf, [])


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:n]):
            return n
    return 0
