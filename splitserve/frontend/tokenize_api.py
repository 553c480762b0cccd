"""POST /tokenize and POST /detokenize, with vLLM's request and response shapes.

/tokenize takes a `prompt` (tokenized as /v1/completions does: `add_special_tokens`
defaults to true) or chat `messages` (rendered by the chat template as
/v1/chat/completions does: `add_generation_prompt` true, `add_special_tokens` false by
default, since the template writes its own; `continue_final_message` leaves the last
message open instead) and answers `{"count", "max_model_len", "tokens", "token_strs"}`
(`token_strs` with `return_token_strs`, else null). /detokenize takes `tokens` and
answers `{"prompt"}`, decoded as vLLM does (special tokens kept). Bad input is a 400
naming the parameter; both sit behind the API key like /v1.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from splitserve.frontend.errors import OpenAIError, bad_request
from splitserve.frontend.openai_protocol import ChatMessage, TokenId, _Strict
from splitserve.frontend.preprocess import OFFLOAD_PROMPT_SIZE, Preprocessor
from splitserve.frontend.request_body import parse_body, read_body
from splitserve.frontend.tools import ToolDefinition


class _TokenizeKind(_Strict):
    """Only tells a chat request (it has `messages`) from a prompt one."""
    messages: Any = None


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False

    def prompt_size(self) -> int:
        return len(self.prompt)


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[ToolDefinition] | None = None   # rendered by the template, as for a chat completion

    def prompt_size(self) -> int:
        return sum(m.num_chars() for m in self.messages)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


def tokenize_model(kind: _TokenizeKind) -> type[TokenizeChatRequest | TokenizeCompletionRequest]:
    return TokenizeChatRequest if kind.messages is not None else TokenizeCompletionRequest


async def tokenize(pre: Preprocessor, req: TokenizeChatRequest | TokenizeCompletionRequest) -> dict:
    if isinstance(req, TokenizeChatRequest) and req.continue_final_message and req.add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
    if req.prompt_size() > OFFLOAD_PROMPT_SIZE:   # seconds of work: off the event loop
        tokens = await asyncio.to_thread(_tokens, pre, req)
    else:
        tokens = _tokens(pre, req)
    strs = pre.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
    return {"count": len(tokens), "max_model_len": pre.max_model_len, "tokens": tokens,
            "token_strs": strs}


def _tokens(pre: Preprocessor, req: TokenizeChatRequest | TokenizeCompletionRequest) -> list[int]:
    if isinstance(req, TokenizeChatRequest):
        return pre.chat_prompt(req, add_generation_prompt=req.add_generation_prompt,
                               continue_final_message=req.continue_final_message,
                               add_special_tokens=req.add_special_tokens)
    return pre.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)


async def detokenize(pre: Preprocessor, req: DetokenizeRequest) -> dict:
    vocab_size = len(pre.tokenizer)
    if (bad := next((t for t in req.tokens if t >= vocab_size), None)) is not None:
        raise bad_request(f"token id {bad} is outside the model's vocabulary (size {vocab_size})",
                          "tokens")
    if len(req.tokens) > OFFLOAD_PROMPT_SIZE:
        return {"prompt": await asyncio.to_thread(pre.tokenizer.decode, req.tokens)}
    return {"prompt": pre.tokenizer.decode(req.tokens)}


async def tokenize_route(request: Request) -> Response:
    fe = request.app.state.frontend
    data = await read_body(request, fe.config.max_request_bytes)
    body = await parse_body(data, tokenize_model(await parse_body(data, _TokenizeKind)))
    return JSONResponse(await tokenize(_model(fe, body), body))


async def detokenize_route(request: Request) -> Response:
    fe = request.app.state.frontend
    body = await parse_body(await read_body(request, fe.config.max_request_bytes), DetokenizeRequest)
    return JSONResponse(await detokenize(_model(fe, body), body))


def _model(fe, body) -> Preprocessor:
    pre, info = fe.require_model()
    if body.model is not None and body.model != info.model_name:
        raise OpenAIError(404, f"The model `{body.model}` does not exist.", "model")
    return pre
