"""Completions' `echo` and `best_of`, as OpenAI defines them (and vLLM's V0 engine did).

echo: the prompt's text comes before the completion's: in `text`, and as the first
streamed chunk of each choice. With max_tokens 0 the answer is the prompt alone and
nothing is generated (no worker is asked). Echo with logprobs would need the prompt
tokens' logprobs, which the engine does not compute: that is a 400 naming `echo`.

best_of: best_of sequences are generated (sharing one prefill, see choices.py), each
with seed + i, and the n with the highest cumulative logprob (the sum of their sampled
tokens' logprobs) are returned, most likely first, as choices 0..n-1. Usage counts the
tokens of all best_of sequences: they were all generated. As OpenAI: best_of >= n, and
best_of > n cannot be streamed (the best are only known at the end).
"""

from __future__ import annotations

import time

import msgspec
from fastapi.responses import Response

from splitserve.disconnect import ClosingStreamingResponse
from splitserve.frontend.errors import bad_request
from splitserve.frontend.openai_protocol import CompletionRequest
from splitserve.frontend.responses import COMPLETION, DONE, sse

MAX_BEST_OF = 64


def generations(body, n: int) -> int:
    """How many sequences to generate for a request asking for n choices."""
    best_of = getattr(body, "best_of", None)
    if best_of is None:
        return n
    if not n <= best_of <= MAX_BEST_OF:
        raise bad_request(f"best_of must be in [n={n}, {MAX_BEST_OF}], got {best_of}", "best_of")
    if best_of > n and body.stream:
        raise bad_request("best_of > n cannot be streamed: the best sequences are known only "
                          "when all have finished", "best_of")
    return best_of


def echo_text(body, tokenizer, prompt: list[int]) -> str:
    """The text echoed before a completion ('' without echo): the prompt as the client
    wrote it, or its decoded token ids."""
    if not isinstance(body, CompletionRequest) or not body.echo:
        return ""
    if body.requested_logprobs() is not None:
        raise bad_request("echo with logprobs needs the prompt tokens' logprobs, which this "
                          "server does not compute", "echo")
    raw = body.prompt[0] if isinstance(body.prompt, list) and len(body.prompt) == 1 else body.prompt
    return raw if isinstance(raw, str) else tokenizer.decode(prompt)


def echo_only(request_id: str, model: str, text: str, num_prompt_tokens: int,
              stream: bool, include_usage: bool) -> Response:
    """The answer to echo with max_tokens 0: the prompt, finish_reason 'length'."""
    usage = {"prompt_tokens": num_prompt_tokens, "completion_tokens": 0,
             "total_tokens": num_prompt_tokens}
    body = {"id": COMPLETION.response_id(request_id), "object": COMPLETION.object_name,
            "created": int(time.time()), "model": model,
            "choices": [COMPLETION.final_choice(0, text, "length")]}
    if not stream:
        return Response(msgspec.json.encode({**body, "usage": usage}), media_type="application/json")

    async def events():
        chunk = {**body, "object": COMPLETION.chunk_object_name}
        if include_usage:
            chunk["usage"] = None
        yield sse(chunk)
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage})
        yield DONE

    return ClosingStreamingResponse(events(), media_type="text/event-stream")
