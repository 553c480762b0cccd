"""Reasoning output (`--reasoning-parser`): a chat answer's text inside `<think>…</think>`
goes to `reasoning_content`, the rest to `content`, as vLLM's parsers of the same names
split it.

The rules (one request's generated text, in order):
- A `<think>` the model writes first is dropped: it only opens the reasoning.
- Reasoning ends at the first `</think>` (dropped too); everything after it is content,
  later tags included.
- deepseek_r1: the output starts in reasoning. R1's chat template already opens
  `<think>` in the prompt, so the model writes only the closing tag; an answer cut off
  before `</think>` is all reasoning.
- qwen3: the output starts in reasoning only when the model writes `<think>` first or the
  prompt left a `<think>` open (templates that open it for the model); otherwise it is
  all content: with `enable_thinking=False` Qwen3's template closes an empty
  `<think></think>` in the prompt and the model writes no tags.

The split works on text, not on token ids, so a tag the tokenizer splits over several
tokens, or that arrives split across stream deltas, is found all the same: text that
may be the start of a tag is held back until it is known not to be one (or the stream
ends). Stop strings are matched before this split, on the whole text, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.frontend.config import REASONING_PARSERS

THINK_START = "<think>"
THINK_END = "</think>"
# Enough of a prompt's tail to hold the generation prompt that may open `<think>`.
_PROMPT_TAIL_TOKENS = 32

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


def prompt_opens_think(tokenizer, prompt_token_ids: list[int]) -> bool:
    """Whether the prompt ends inside a `<think>` block (the template opened it)."""
    tail = tokenizer.decode(prompt_token_ids[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    return tail.rfind(THINK_START) > tail.rfind(THINK_END)


class ReasoningSplitter:
    """One request's text, split as it streams. feed() returns what is safe to emit now;
    flush() the rest once the stream ended. `reasoning_tokens` counts the tokens up to the one whose text ended it (all of them
    while it lasts), by the token counts feed() is given with each piece of text."""

    def __init__(self, parser: str, prompt_opened: bool = False):
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; one of {REASONING_PARSERS}")
        self._starts_in_reasoning = parser == "deepseek_r1" or prompt_opened
        self._state = _START
        self._pending = ""
        self.reasoning_tokens = 0

    def feed(self, text: str, num_tokens: int = 0) -> ReasoningDelta:
        """num_tokens: tokens generated so far, `text` included: while reasoning lasts, and
        when it ends, they are the reasoning tokens (usage's reasoning_tokens)."""
        was_reasoning = self._state == _REASONING or (
            self._state == _START and self._starts_in_reasoning)
        out = self._feed(text)
        if self._state == _REASONING or (was_reasoning and self._state != _START):
            self.reasoning_tokens = num_tokens
        return out

    def _feed(self, text: str) -> ReasoningDelta:
        out = ReasoningDelta()
        buf = self._pending + text
        self._pending = ""
        if self._state == _START:
            if buf.startswith(THINK_START):
                buf = buf[len(THINK_START):]
                self._state = _REASONING
            elif THINK_START.startswith(buf):       # maybe the opening tag: wait
                self._pending = buf
                return out
            else:
                self._state = _REASONING if self._starts_in_reasoning else _CONTENT
        if self._state == _REASONING:
            end = buf.find(THINK_END)
            if end < 0:
                hold = _partial_suffix(buf, THINK_END)
                out.reasoning, self._pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
                return out
            out.reasoning, buf = buf[:end], buf[end + len(THINK_END):]
            self._state = _CONTENT
        out.content = buf
        return out

    def flush(self, num_tokens: int = 0) -> ReasoningDelta:
        """The stream ended: held-back text is what it was taken for (no tag came)."""
        pending, self._pending = self._pending, ""
        if self._state == _START:
            self._state = _REASONING if self._starts_in_reasoning else _CONTENT
        if self._state == _REASONING:
            self.reasoning_tokens = num_tokens
            return ReasoningDelta(reasoning=pending)
        return ReasoningDelta(content=pending)


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


def splitter_for(parser: str | None, tokenizer, prompt_token_ids: list[int]) -> ReasoningSplitter | None:
    """A chat request's splitter under `--reasoning-parser parser` (None: no parser)."""
    if parser is None:
        return None
    # R1 always starts in reasoning: no need to look at its prompt.
    opened = parser == "qwen3" and prompt_opens_think(tokenizer, prompt_token_ids)
    return ReasoningSplitter(parser, opened)
