"""Turns a validated OpenAI request into a worker GenerateRequest: prompt tokens (chat
template or raw prompt), the context-length check with vLLM's wording, sampling.

Everything here fails with a 400 OpenAIError naming the offending parameter, before any
work reaches a worker. A big prompt is templated and tokenized on a thread: tokenizing
megabytes takes seconds, during which the event loop (every other request, /live) would
otherwise stand still.
"""

from __future__ import annotations

import asyncio

from splitserve.engine.types import SamplingError, SamplingParams
from splitserve.frontend.errors import bad_request
from splitserve.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from splitserve.frontend.tools import template_message, template_tools

# OpenAI's (and vLLM's) default for /v1/completions; chat defaults to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Prompts above this many characters (or token ids) are turned into tokens off the event
# loop; below it the thread hop would cost more than the work (well under a millisecond).
OFFLOAD_PROMPT_SIZE = 64 * 1024


class Preprocessor:
    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    async def prompt(self, req: ChatCompletionRequest | CompletionRequest, chat: bool) -> list[int]:
        """The request's prompt tokens (chat template or raw prompt)."""
        build = self.chat_prompt if chat else self.completion_prompt
        if req.prompt_size() > OFFLOAD_PROMPT_SIZE:
            return await asyncio.to_thread(build, req)
        return build(req)

    def chat_prompt(self, req: ChatCompletionRequest, *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    add_special_tokens: bool = False) -> list[int]:
        """The keywords are /tokenize's (tokenize_api.py); a chat completion uses the defaults."""
        try:
            messages = [template_message(m.role, m.text(), m.tool_calls, m.tool_call_id, m.name)
                        for m in req.messages]
            text = self.tokenizer.apply_chat_template(
                messages, tools=template_tools(req.tools), tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
        except Exception as e:  # a template may raise on roles or orderings it does not allow
            raise bad_request(f"cannot apply the chat template to these messages: {e}", "messages") from e
        # The template already wrote the special tokens (BOS, role markers) it wants.
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one is one prompt
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        raise bad_request("only one prompt per request is supported; send a batch as separate requests",
                          "prompt")

    def sampling(self, req: ChatCompletionRequest | CompletionRequest, num_prompt_tokens: int,
                 chat: bool) -> SamplingParams:
        if num_prompt_tokens == 0:
            raise bad_request("the prompt is empty", "messages" if chat else "prompt")
        if chat and req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if (logit_bias := req.logit_bias_pairs()) is None:
            raise bad_request("logit_bias keys must be token ids (strings of digits)", "logit_bias")
        max_tokens = req.requested_max_tokens()
        n = self.max_model_len
        if max_tokens is None:
            if num_prompt_tokens >= n:
                raise bad_request(
                    f"This model's maximum context length is {n} tokens. However, you requested "
                    f"{num_prompt_tokens} tokens in the messages, Please reduce the length of "
                    f"the messages.", "messages" if chat else "prompt")
            max_tokens = n - num_prompt_tokens if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS,
                                                                 n - num_prompt_tokens)
        elif max_tokens >= 1 and num_prompt_tokens + max_tokens > n:
            raise bad_request(
                f"This model's maximum context length is {n} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                f"completion.", "messages" if chat else "prompt")
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                seed=req.seed, stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos, logprobs=req.requested_logprobs(),
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                logit_bias=logit_bias, min_tokens=req.min_tokens)
        except SamplingError as e:
            param = "max_completion_tokens" if (e.param == "max_tokens" and chat
                                                and req.max_completion_tokens is not None) else e.param
            raise bad_request(str(e), param) from e
        return params
