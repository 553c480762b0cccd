"""n > 1: one request's n sequences, each its own Generation on the workers.

Choice i samples with seed + i (vLLM's rule for a parent request's children, wrapped
into the seed's range), so a seeded n > 1 request is reproducible and its choices
differ; without a seed each has fresh randomness anyway. Choice 0 keeps the request's
id; choice i's worker-side id is `<id>-n<i>`, so every log line still starts with it.

One prefill, one KV transfer for all n: choice 0 is routed and started first; once its
first token is out, its worker holds the whole prompt's KV in its prefix cache (computed
there, or transferred from a prefill worker and committed), and choices 1..n-1 go to that
same worker as requests it computes itself: the prefix cache gives them every full block,
so each computes only the prompt's last partial block (at least its last token, whose
logits sample its first token). If that worker cannot take a sibling (full, gone), the
sibling is routed as any request is. The cost: siblings start one prefill later than they
would in parallel, which is when the prompt's KV exists at all.
"""

from __future__ import annotations

import asyncio

import anyio
import msgspec

from splitserve.engine.types import SEED_MAX, SEED_MIN
from splitserve.frontend.generation import Generation
from splitserve.worker import protocol as p

MAX_N = 64


def child_request(request: p.GenerateRequest, index: int) -> p.GenerateRequest:
    if index == 0:
        return request
    seed = request.sampling.seed
    if seed is not None:
        seed = (seed + index - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
    return msgspec.structs.replace(request, request_id=f"{request.request_id}-n{index}",
                                   sampling=msgspec.structs.replace(request.sampling, seed=seed))


async def start_all(gens: list[Generation]) -> None:
    """Start every generation, choice 0 first (see the module docstring); if one cannot
    start, the started ones are abandoned and its error raised. Cancelled (the client
    left): the started ones are abandoned."""
    first, siblings = gens[0], gens[1:]
    await first.start()
    started: list[Generation] = [first]

    async def start(gen: Generation) -> None:
        await gen.start()
        started.append(gen)

    try:
        if siblings:
            await first.first_token_seen()
            for gen in siblings:
                gen.share_prompt_of(first)
        results = await asyncio.gather(*(start(g) for g in siblings), return_exceptions=True)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):   # see disconnect.cancel_and_wait
            await asyncio.gather(*(g.abandon("the client left") for g in started),
                                 return_exceptions=True)
        raise
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        await asyncio.gather(*(g.abandon(f"another choice could not start: {failed}") for g in started),
                             return_exceptions=True)
        raise failed
