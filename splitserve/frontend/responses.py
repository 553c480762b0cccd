"""OpenAI response bodies for chat and text completions, streamed (SSE) or whole.

Chat and text completions differ only in names and in where the text goes (a `delta` /
`message` object vs a `text` field), captured by `Shape`; the flow is shared. With a
reasoning parser (chat only) the text is split into `reasoning_content` and `content`
(reasoning.py) and usage counts `completion_tokens_details.reasoning_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from fastapi.responses import Response

from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.generation import Delta, Generation
from splitserve.frontend.logprobs import LogprobsFormatter
from splitserve.frontend.reasoning import ReasoningDelta, ReasoningSplitter

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Shape:
    chat: bool

    def response_id(self, request_id: str) -> str:
        """The body's `id`: OpenAI's prefix on the internal request id (the client's
        x-request-id plus a unique suffix, see request_ids.py), as vLLM prefixes its own."""
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object_name(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def stream_choice(self, text: str | None, finish_reason: str | None, first: bool = False,
                      reasoning: str | None = None, logprobs: dict | None = None) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        delta: dict = {"role": "assistant"} if first else {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def final_choice(self, text: str | None, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish_reason}


CHAT = Shape(chat=True)
COMPLETION = Shape(chat=False)


def _usage(gen: Generation, reasoning: ReasoningSplitter | None) -> dict:
    usage = {"prompt_tokens": gen.num_prompt_tokens, "completion_tokens": gen.num_generated_tokens,
             "total_tokens": gen.num_prompt_tokens + gen.num_generated_tokens}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning.reasoning_tokens}
    return usage


def _split(reasoning: ReasoningSplitter | None, gen: Generation, delta: Delta) -> ReasoningDelta:
    """A delta's text as (reasoning, content); without a parser it is all content."""
    if reasoning is None:
        return ReasoningDelta(content=delta.text)
    out = reasoning.feed(delta.text, gen.num_generated_tokens)
    if delta.finish_reason is not None:
        rest = reasoning.flush(gen.num_generated_tokens)
        out = ReasoningDelta(out.reasoning + rest.reasoning, out.content + rest.content)
    return out


def _sse(obj: dict) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def full_response(shape: Shape, gen: Generation, model: str,
                        reasoning: ReasoningSplitter | None = None, tokenizer=None) -> Response:
    """tokenizer: turns logprobs' token ids into text (needed when the request asked for logprobs)."""
    parts: list[str] = []
    thoughts: list[str] = []
    entries = []
    finish_reason = None
    try:
        async for delta in gen.deltas():
            split = _split(reasoning, gen, delta)
            parts.append(split.content)
            thoughts.append(split.reasoning)
            entries.extend(delta.logprobs)
            finish_reason = delta.finish_reason
    except OpenAIError as e:  # already counted by the Generation
        return e.response()
    logprobs = (LogprobsFormatter(tokenizer, shape.chat).format(entries)
                if gen.logprobs_requested else None)
    if reasoning is None:
        choice = shape.final_choice("".join(parts), finish_reason, logprobs)
    else:   # as vLLM: a part that is empty is null
        choice = shape.final_choice("".join(parts) or None, finish_reason, logprobs)
        choice["message"]["reasoning_content"] = "".join(thoughts) or None
    body = {"id": shape.response_id(gen.request_id), "object": shape.object_name, "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(gen, reasoning)}
    return Response(msgspec.json.encode(body), media_type="application/json")


async def stream_events(shape: Shape, gen: Generation, model: str, include_usage: bool,
                        reasoning: ReasoningSplitter | None = None,
                        tokenizer=None) -> AsyncIterator[bytes]:
    created = int(time.time())
    formatter = LogprobsFormatter(tokenizer, shape.chat) if gen.logprobs_requested else None

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        body = {"id": shape.response_id(gen.request_id), "object": shape.chunk_object_name, "created": created,
                "model": model, "choices": choices}
        if include_usage:  # OpenAI: with include_usage every chunk has a usage field
            body["usage"] = usage
        return _sse(body)

    if shape.chat:  # the first chat delta announces the role
        yield chunk([shape.stream_choice("", None, first=True)])
    try:
        async for delta in gen.deltas():
            split = _split(reasoning, gen, delta)
            logprobs = formatter.format(delta.logprobs) if formatter and delta.logprobs else None
            if split.content or split.reasoning or logprobs:
                yield chunk([shape.stream_choice(split.content or None, None,
                                                 reasoning=split.reasoning, logprobs=logprobs)])
            if delta.finish_reason is not None:
                yield chunk([shape.stream_choice(None if shape.chat else "", delta.finish_reason)])
    except OpenAIError as e:  # headers are sent: the error travels as an event (as vLLM does)
        yield _sse(e.body())
    else:
        if include_usage:
            yield chunk([], _usage(gen, reasoning))
    yield DONE
