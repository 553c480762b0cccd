"""OpenAI's logprobs objects from the engine's TokenLogprobs: chat's
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` and completions'
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, streamed (the entries of
one delta's tokens) or whole.

A token's text is the tokenizer's decode of that token alone (as vLLM's server does), so
it may be part of a character (U+FFFD); `bytes` holds its UTF-8 bytes. Completions'
`top_logprobs` maps token text to logprob and includes the sampled token, as vLLM's
does; text_offset counts characters from the start of the generated text.
"""

from __future__ import annotations

from splitserve.engine.types import TokenLogprobs


class LogprobsFormatter:
    def __init__(self, tokenizer, chat: bool):
        self._tokenizer = tokenizer
        self._chat = chat
        self._offset = 0    # completions: characters of token text emitted so far

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _chat_entry(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def format(self, entries: list[TokenLogprobs]) -> dict:
        """The `logprobs` object of a choice (or of one stream chunk's choice)."""
        if self._chat:
            return {"content": [
                {**self._chat_entry(e.token_id, e.logprob),
                 "top_logprobs": [self._chat_entry(t, lp) for t, lp in e.top]}
                for e in entries]}
        tokens, offsets, tops = [], [], []
        for e in entries:
            text = self._text(e.token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            top = {self._text(t): lp for t, lp in e.top}
            top.setdefault(text, e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": tops, "text_offset": offsets}
