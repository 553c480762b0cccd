"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeded generators.

Greedy rows are resolved with one batched argmax. Random rows are sampled one by one so
that a request with a seed consumes only its own generator: its output is reproducible
whatever else shares the batch.

A seeded request's generator is derived afresh for every token from (seed, position)
(position_generator), never carried from one token to the next: the token at a position
is the same whichever engine samples it — aggregated, the prefill worker for the first
token and a decode worker for the rest, or a second decode worker after a migration.

Each sampled token comes as a Sampled, with its logprobs (TokenLogprobs) when the
request asked for them: the log-softmax of the raw logits, before temperature, top-k and
top-p (vLLM's default logprobs mode), computed in one batch for the rows that want it.

A structured request's row is masked first by its grammar (engine/grammar.py), so raw
logprobs see the mask, as vLLM's do. A row that cannot be sampled (non-finite logits,
probabilities torch refuses, output that broke its grammar, any error while sampling it)
yields a SampleFailure for that row alone: one request's bad numbers must never stop the
batch, or the engine.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from splitserve.engine.grammar import mask_rows
from splitserve.engine.logits_processors import process_row
from splitserve.engine.types import SamplingParams, TokenLogprobs


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """A bijective 64-bit mixer: nearby inputs (seed, seed + 1; position, position + 1)
    give unrelated outputs, so streams for neighbouring seeds or positions never overlap."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_generator(seed: int, position: int) -> torch.Generator:
    """The generator for the token at `position` (its index in prompt + output) of a
    request with `seed`: a pure function of the two, so any engine reproduces it."""
    return torch.Generator().manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ position))


class SampleFailure(Exception):
    """Why one row could not be sampled; the engine fails that request with it."""


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprobs: TokenLogprobs | None = None


def token_logprobs(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprobs]:
    """logits: [N, V]; row i's sampled token_ids[i] and its ks[i] most likely tokens."""
    # Clamped as vLLM's server does: -inf (an underflowed probability) is no JSON number.
    lp = torch.log_softmax(logits.float(), dim=-1).clamp(min=-9999.0)
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    k_max = max(ks)
    top_vals, top_ids = (lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long()))
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [TokenLogprobs(t, c, tuple(zip(ids[:k], vals[:k])))
            for t, c, k, ids, vals in zip(token_ids, chosen, ks, top_ids, top_vals)]


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
               generators: list[torch.Generator | None],
               requests: list | None = None) -> list[Sampled | SampleFailure]:
        """logits: [N, V] float32 (on any device); one token, or the row's failure, per row.
        requests: the rows' engine Requests, whose token history penalties and min_tokens
        read (logits_processors.py); None only where no row's params process logits."""
        raw = logits.float()
        finite = torch.isfinite(raw).all(-1).tolist()
        refused: dict[int, str] = {}
        if any(p.structured is not None for p in params):
            raw = raw.clone()   # NOTE: masked after the finiteness check: -inf is the mask
            refused = mask_rows(raw, requests)
            for i in refused:
                finite[i] = False
        logits = raw
        if any(p.processes_logits for p in params):
            logits = raw.clone()
            for i, p in enumerate(params):
                if p.processes_logits and finite[i]:
                    logits[i] = process_row(raw[i], requests[i])
        out: list[int | SampleFailure] = [
            0 if ok else SampleFailure("the model produced non-finite logits (NaN or infinity)")
            for ok in finite]
        for i, why in refused.items():
            out[i] = SampleFailure(why)
        greedy = [i for i, p in enumerate(params) if p.greedy and finite[i]]
        if greedy:
            ids = logits[greedy].argmax(-1).tolist()
            for i, t in zip(greedy, ids):
                out[i] = t
        for i, p in enumerate(params):
            if p.greedy or not finite[i]:
                continue
            try:
                out[i] = self._sample_row(logits[i], p, generators[i] or self.generator)
            except SampleFailure as e:
                out[i] = e
            except Exception as e:  # noqa: BLE001 - any error here is this row's alone
                out[i] = SampleFailure(f"sampling failed: {type(e).__name__}: {e}")
        return self._with_logprobs(raw, params, out)

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, params: list[SamplingParams],
                       tokens: list[int | SampleFailure]) -> list[Sampled | SampleFailure]:
        rows = [i for i, (p, t) in enumerate(zip(params, tokens))
                if p.logprobs is not None and not isinstance(t, SampleFailure)]
        lps = token_logprobs(logits[rows], [tokens[i] for i in rows],
                             [params[i].logprobs for i in rows]) if rows else []
        by_row = dict(zip(rows, lps))
        return [t if isinstance(t, SampleFailure) else Sampled(t, by_row.get(i))
                for i, t in enumerate(tokens)]

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        row = apply_top_k_top_p(logits.cpu() / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        # NOTE: a finite row over a temperature >= SAMPLING_EPS stays finite; checked anyway,
        # so that torch.multinomial never sees what it would raise on.
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            raise SampleFailure(f"the probabilities at temperature {p.temperature} are not a "
                                "distribution (NaN, infinity or all zero)")
        return int(torch.multinomial(probs, 1, generator=gen).item())
