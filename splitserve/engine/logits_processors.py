"""The sampling controls that change a request's logits before it is sampled, as vLLM's
sampler defines them (vllm/v1/sample: min_tokens, logit_bias, then penalties):

- min_tokens: while fewer than min_tokens tokens are out, the stop tokens (EOS unless
  ignore_eos, and stop_token_ids) get -inf.
- logit_bias: added to the named tokens' logits.
- repetition_penalty r, over every token of prompt and output: a positive logit is
  divided by r, a negative one multiplied by it.
- frequency_penalty f and presence_penalty p, over output tokens only: logit -= f *
  count(token) + p * (count(token) > 0).

"Output" includes the prompt's last `resumed_output_tokens` tokens: what a migrated
request generated before it moved. Logprobs are taken from the logits before all this
(vLLM's default raw_logprobs).
"""

from __future__ import annotations

import torch


def process_row(logits: torch.Tensor, request) -> torch.Tensor:
    """logits: [V] float32 of one request (not modified); returns the processed row.
    request: an engine Request (params, prompt_token_ids, output_token_ids, stop_token_ids)."""
    p = request.params
    row = logits.clone()
    vocab = row.numel()
    if request.num_output_tokens < p.min_tokens and request.stop_token_ids:
        stops = torch.tensor(sorted(t for t in request.stop_token_ids if t < vocab), dtype=torch.long)
        row[stops.to(row.device)] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=row.device)
        row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype,
                                            device=row.device))
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(request.all_token_ids, dtype=torch.long, device=row.device).unique()
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    output = request.all_token_ids[max(request.num_prompt_tokens - p.resumed_output_tokens, 0):]
    if (p.frequency_penalty or p.presence_penalty) and output:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long),
                                minlength=vocab)[:vocab].to(row.device, row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return row
