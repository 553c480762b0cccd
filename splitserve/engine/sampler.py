"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeded generators.

Greedy rows are resolved with one batched argmax. Random rows are sampled one by one so
that a request with a seed consumes only its own generator: its output is reproducible
whatever else shares the batch.
"""

from __future__ import annotations

import torch

from splitserve.engine.types import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] float32, already divided by temperature. Returns masked logits."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
        """logits: [N, V] float32 (on any device); one token per row."""
        logits = logits.float()
        greedy = [i for i, p in enumerate(params) if p.greedy]
        out = [0] * len(params)
        if greedy:
            ids = logits[greedy].argmax(-1).tolist()
            for i, t in zip(greedy, ids):
                out[i] = t
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = apply_top_k_top_p(logits[i].cpu() / p.temperature, p.top_k, p.top_p)
            probs = row.softmax(-1)
            gen = generators[i] or self.generator
            out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
        return out
