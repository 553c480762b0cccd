"""OpenAI response bodies for chat and text completions, streamed (SSE) or whole.

Chat and text completions differ only in names and in where the text goes (a `delta` /
`message` object vs a `text` field), captured by `Shape`; the flow is shared. With a
reasoning parser (chat only) the text is split into `reasoning_content` and `content`
(reasoning.py) and usage counts `completion_tokens_details.reasoning_tokens`.

A request with n > 1 has n Choices, one Generation each, run concurrently: the whole
body lists them by index; a stream interleaves their chunks as they come, each naming
its choice's index. Usage counts the prompt once and every choice's tokens.

With tools (tools.py) a chat choice's content is parsed into `tool_calls` (whole) or
`delta.tool_calls` chunks, and a choice that called a tool finishes with "tool_calls".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from fastapi.responses import Response

from splitserve.disconnect import cancel_and_wait
from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.generation import Delta, Generation
from splitserve.frontend.logprobs import LogprobsFormatter
from splitserve.frontend.reasoning import ReasoningDelta, ReasoningSplitter
from splitserve.frontend.tools import ToolOutput

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

    def stream_choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False,
                      reasoning: str | None = None, logprobs: dict | None = None,
                      tool_calls: list[dict] | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        delta: dict = {"role": "assistant"} if first else {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def final_choice(self, index: int, text: str | None, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish_reason}


CHAT = Shape(chat=True)
COMPLETION = Shape(chat=False)


@dataclass
class Choice:
    """One of a request's n sequences: its generation, and its own reasoning splitter,
    logprobs formatter and tool-call extractor (each holds per-sequence state)."""

    index: int
    gen: Generation
    reasoning: ReasoningSplitter | None = None
    logprobs: LogprobsFormatter | None = None
    tools: ToolOutput | None = None
    echo: str = ""     # completions' echo: the prompt's text, before the choice's own


def _usage(choices: list[Choice]) -> dict:
    prompt = choices[0].gen.num_prompt_tokens
    completion = sum(c.gen.num_generated_tokens for c in choices)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}
    if choices[0].reasoning is not None:
        usage["completion_tokens_details"] = {
            "reasoning_tokens": sum(c.reasoning.reasoning_tokens for c in choices)}
    return usage


def _split(choice: Choice, delta: Delta) -> ReasoningDelta:
    """A delta's text as (reasoning, content); without a parser it is all content."""
    reasoning, gen = choice.reasoning, choice.gen
    if reasoning is None:
        return ReasoningDelta(content=delta.text)
    out = reasoning.feed(delta.text, gen.num_generated_tokens)
    if delta.finish_reason is not None:
        rest = reasoning.flush(gen.num_generated_tokens)
        out = ReasoningDelta(out.reasoning + rest.reasoning, out.content + rest.content)
    return out


def sse(obj: dict) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def _whole_choice(shape: Shape, choice: Choice) -> tuple[dict, float]:
    """The choice's body, and its cumulative logprob (the sampled tokens' logprobs
    summed; 0 when none were computed), which best_of ranks by."""
    parts: list[str] = [choice.echo]
    thoughts: list[str] = []
    entries = []
    finish_reason = None
    async for delta in choice.gen.deltas():
        split = _split(choice, delta)
        parts.append(split.content)
        thoughts.append(split.reasoning)
        entries.extend(delta.logprobs)
        finish_reason = delta.finish_reason
    logprobs = choice.logprobs.format(entries) if choice.logprobs else None
    cumulative = sum(e.logprob for e in entries)
    content: str | None = "".join(parts)
    calls = []
    if choice.tools is not None:
        parsed = choice.tools.parse(content)
        content, calls = parsed.content, parsed.calls
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
    if choice.reasoning is None and choice.tools is None:
        return shape.final_choice(choice.index, content, finish_reason, logprobs), cumulative
    # As vLLM: a part that is empty is null.
    body = shape.final_choice(choice.index, content or None, finish_reason, logprobs)
    if choice.reasoning is not None:
        body["message"]["reasoning_content"] = "".join(thoughts) or None
    if choice.tools is not None:
        body["message"]["tool_calls"] = [c.to_json() for c in calls]
    return body, cumulative


async def full_response(shape: Shape, choices: list[Choice], model: str,
                        keep: int | None = None) -> Response:
    """keep: return only this many choices, those with the highest cumulative logprob,
    best first (best_of); usage still counts every choice's tokens."""
    results = await asyncio.gather(*(_whole_choice(shape, c) for c in choices), return_exceptions=True)
    for r in results:
        if isinstance(r, OpenAIError):  # already counted by the Generation
            return r.response()
        if isinstance(r, BaseException):
            raise r
    bodies = [body for body, _ in results]
    if keep is not None:
        best = sorted(results, key=lambda r: r[1], reverse=True)[:keep]
        bodies = [{**body, "index": i} for i, (body, _) in enumerate(best)]
    body = {"id": shape.response_id(choices[0].gen.request_id), "object": shape.object_name,
            "created": int(time.time()), "model": model, "choices": bodies,
            "usage": _usage(choices)}
    return Response(msgspec.json.encode(body), media_type="application/json")


async def _choice_chunks(shape: Shape, choice: Choice, out: asyncio.Queue) -> None:
    """Puts the choice's stream choices (dicts) on `out`, then None; an OpenAIError too."""
    i = choice.index
    try:
        if choice.echo:
            out.put_nowait(shape.stream_choice(i, choice.echo, None))
        async for delta in choice.gen.deltas():
            split = _split(choice, delta)
            logprobs = choice.logprobs.format(delta.logprobs) if choice.logprobs and delta.logprobs else None
            content, calls = split.content, []
            if choice.tools is not None:
                content, calls = choice.tools.feed(content)
                if delta.finish_reason is not None:
                    rest, more = choice.tools.flush()
                    content, calls = content + rest, calls + more
            if content or split.reasoning or logprobs or calls:
                out.put_nowait(shape.stream_choice(i, content or None, None, reasoning=split.reasoning,
                                                  logprobs=logprobs, tool_calls=calls))
            if delta.finish_reason is not None:
                reason = delta.finish_reason
                if choice.tools is not None and choice.tools.num_calls and reason == "stop":
                    reason = "tool_calls"
                out.put_nowait(shape.stream_choice(i, None if shape.chat else "", reason))
    except OpenAIError as e:
        out.put_nowait(e)
    finally:
        out.put_nowait(None)


async def stream_events(shape: Shape, choices: list[Choice], model: str,
                        include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    request_id = choices[0].gen.request_id

    def chunk(body_choices: list[dict], usage: dict | None = None) -> bytes:
        body = {"id": shape.response_id(request_id), "object": shape.chunk_object_name,
                "created": created, "model": model, "choices": body_choices}
        if include_usage:  # OpenAI: with include_usage every chunk has a usage field
            body["usage"] = usage
        return sse(body)

    if shape.chat:  # the first chat delta of each choice announces the role
        for c in choices:
            yield chunk([shape.stream_choice(c.index, "", None, first=True)])
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_choice_chunks(shape, c, queue)) for c in choices]
    try:
        running, error = len(tasks), None
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, OpenAIError):
                error = item
                break
            else:
                yield chunk([item])
        if error is not None:  # headers are sent: the error travels as an event (as vLLM does)
            yield sse(error.body())
        elif include_usage:
            yield chunk([], _usage(choices))
        yield DONE
    finally:
        # A client gone, or one choice failed: the others' worker streams close (their
        # requests are aborted and free their KV blocks).
        await cancel_and_wait(tasks)
