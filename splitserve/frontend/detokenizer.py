"""Incremental detokenization that only ever emits whole characters.

A byte-level tokenizer splits a multi-byte UTF-8 character across tokens; decoding a
partial character yields U+FFFD. We hold such text back until the character completes
(the decoded text no longer ends in U+FFFD) and release it then, so a stream never
contains a replacement character that the full text would not. Bytes that never form a
valid character are released as U+FFFD by flush() at the end, as the full decode would.

Each step decodes a short window: the tokens already emitted since the previous release
(as context, because tokenizers like SentencePiece decode a token's leading space
differently at the start of a string) plus the new ones, and emits the difference.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        # NOTE: ids[:read_offset] are emitted; ids[prefix_offset:read_offset] is the context
        # window whose text was the tail of what we emitted.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def push(self, token_ids: list[int]) -> str:
        """Add generated token ids; return the text they complete (maybe empty)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The stream ended: release whatever was held back, as the full decode has it."""
        return self._advance(final=True)
