"""splitserve's SamplingParams as vLLM's, and vLLM's outputs as our RequestOutputs.

Both engines define the controls the same way (splitserve copied vLLM's definitions:
penalties, logit_bias, min_tokens, raw logprobs before temperature), so the mapping is
field for field. A field vLLM cannot honour is refused, never silently dropped: a new
SamplingParams field not mapped here is a 400 on vLLM workers until it is.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec

from splitserve.engine.errors import RequestError
from splitserve.engine.types import FinishReason, RequestOutput, SamplingParams, TokenLogprobs
from splitserve.structured_output import StructuredOutput

logger = logging.getLogger(__name__)

# Every SamplingParams field this module maps (or, for resumed_output_tokens, accounts
# for); to_vllm refuses a request that sets any other.
_MAPPED = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos",
    "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "min_tokens", "resumed_output_tokens", "structured"})
_DEFAULTS = {f.name: f.default for f in msgspec.structs.fields(SamplingParams)}

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
           "abort": FinishReason.ABORT, "error": FinishReason.ERROR,
           # vLLM's repetition detection ended the output: a stop, as far as a client goes.
           "repetition": FinishReason.STOP}


def to_vllm(request_id: str, params: SamplingParams):
    """A vllm.SamplingParams streaming deltas of token ids (no text: the frontend
    detokenizes). Raises RequestError for a field vLLM workers do not support."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    for name, default in _DEFAULTS.items():
        if name not in _MAPPED and getattr(params, name) != default:
            raise RequestError(f"{name} is not supported by vLLM workers", name)
    if params.resumed_output_tokens and params.structured is not None:
        # vLLM's grammar would start at the first token after the resumed output, in the
        # middle of the structure: the continuation could not be valid. Refused, not wrong.
        raise RequestError("a structured output request cannot continue on a vLLM worker after "
                           "a migration: vLLM's grammar cannot start inside the output so far",
                           "response_format")
    if params.resumed_output_tokens and (params.presence_penalty or params.frequency_penalty):
        # vLLM counts the resumed tokens as prompt, which its presence and frequency
        # penalties do not look at: the rest of a migrated request may differ slightly.
        logger.info("request_id=%s resumes %d output tokens as prompt: vLLM's presence and "
                    "frequency penalties will not count them", request_id,
                    params.resumed_output_tokens)
    return VllmSamplingParams(
        n=1, max_tokens=params.max_tokens,
        # Below SAMPLING_EPS ours is greedy; vLLM's greedy is exactly 0.
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p, top_k=max(params.top_k, 0), seed=params.seed,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        logprobs=params.logprobs, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias) or None, min_tokens=params.min_tokens,
        structured_outputs=_structured(params.structured),
        detokenize=False, skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA)


def _structured(structured: StructuredOutput | None):
    """Our structured output request as vLLM's (the same kinds: vLLM compiles them with
    its own backend, xgrammar by default)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams
    kind, spec = structured.kind, structured.spec
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        return StructuredOutputsParams(json=spec)
    if kind == "choice":
        return StructuredOutputsParams(choice=json.loads(spec))
    if kind == "regex":
        return StructuredOutputsParams(regex=spec)
    return StructuredOutputsParams(grammar=spec)


def from_vllm(request_id: str, out: Any, num_prompt_tokens: int,
              num_logprobs: int | None) -> RequestOutput:
    """One vllm.RequestOutput (a delta) as ours."""
    completion = out.outputs[0]
    token_ids = list(completion.token_ids)
    finish = _FINISH.get(completion.finish_reason) if out.finished else None
    if out.finished and finish is None:
        logger.warning("request_id=%s: unknown vLLM finish reason %r, reported as stop",
                       request_id, completion.finish_reason)
        finish = FinishReason.STOP
    return RequestOutput(
        request_id=request_id, new_token_ids=token_ids, finished=out.finished,
        finish_reason=finish, num_prompt_tokens=num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens or 0,
        error=("vLLM failed this request" if finish is FinishReason.ERROR else None),
        logprobs=(None if num_logprobs is None
                  else _logprobs(token_ids, completion.logprobs, num_logprobs)))


def _logprobs(token_ids: list[int], entries: Any, k: int) -> list[TokenLogprobs]:
    """vLLM gives, per token, a mapping token id -> Logprob(logprob, rank) holding the k
    most likely tokens and the sampled one (which may be among them)."""
    result = []
    for i, token in enumerate(token_ids):
        entry = entries[i]
        top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                     key=lambda item: item[1].rank)
        result.append(TokenLogprobs(token, float(entry[token].logprob),
                                    tuple((t, float(lp.logprob)) for t, lp in top)))
    return result
