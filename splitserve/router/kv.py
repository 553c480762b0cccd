"""KV-aware routing: send a prompt where its prefix is cached, unless that worker is busy.

Prefill cost of worker w for a prompt of B full-or-partial blocks:

    cost(w) = overlap_weight × (B − overlap(w)) + pending_prefill_tokens(w) / block_size

— the blocks w must still compute, plus the prefill work queued ahead of it, both in
blocks. A cached prefix wins until the queue in front of it costs more than recomputing
elsewhere. Decode choice: a worker that can hold the prompt, with the fewest requests
(every sequence in a decode batch slows each step), then the most free KV.

Ties rotate among the tied workers: with no cached prefixes and equal loads, requests
alternate instead of all landing on the first worker by id.
"""

from __future__ import annotations

import math
from typing import Sequence

from splitserve.router.index import KVIndex
from splitserve.router.load import WorkerLoad
from splitserve.router.policy import Decision, RouteRequest, RoutingPolicy, by_id


def _fewest_requests_then_most_free(w: WorkerLoad) -> tuple[int, int]:
    return (w.num_requests, -w.kv_blocks_free)


def _most_free(w: WorkerLoad) -> tuple[int]:
    return (-w.kv_blocks_free,)


class KvPolicy(RoutingPolicy):
    name = "kv"

    def __init__(self, index: KVIndex, overlap_weight: float = 1.0) -> None:
        self.index = index
        self.overlap_weight = overlap_weight
        self._turn = {"prefill": 0, "decode": 0}

    def select_prefill(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        ordered = by_id(workers, "prefill")
        bs = self.index.block_size
        num_blocks = math.ceil(request.num_prompt_tokens / bs)
        overlaps = self.index.overlap([w.worker_id for w in ordered], list(request.block_hashes))
        # Rounded so that float noise cannot break a tie that the next key should decide.
        keys = {w.worker_id: (round(self.overlap_weight * (num_blocks - overlaps[w.worker_id])
                                    + w.num_pending_prefill_tokens / bs, 9), w.num_requests)
                for w in ordered}
        best = min(keys.values())
        chosen = self._rotate("prefill", [w for w in ordered if keys[w.worker_id] == best])
        # Until its KV events arrive, count the prompt as cached on the chosen worker, so
        # the next request with this prefix follows it there.
        self.index.predict(chosen.worker_id, request.block_hashes)
        return Decision(chosen.worker_id, overlaps[chosen.worker_id], best[0])

    def select_decode(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        ordered = by_id(workers, "decode")
        # The prompt's blocks plus room for the first generated token.
        needed = math.ceil((request.num_prompt_tokens + 1) / self.index.block_size)
        # Unknown capacity (not reported yet) is not treated as full.
        fits = [w for w in ordered if w.kv_blocks_total == 0 or w.kv_blocks_free >= needed]
        if fits:
            key = _fewest_requests_then_most_free
        else:
            # Nobody can hold it now: the one with the most free KV is likeliest to make
            # room first (a worker that cannot refuses with 503, and the frontend tries
            # another).
            fits, key = ordered, _most_free
        best = min(key(w) for w in fits)
        chosen = self._rotate("decode", [w for w in fits if key(w) == best])
        return Decision(chosen.worker_id, cost=float(chosen.num_requests))

    def _rotate(self, role: str, tied: list[WorkerLoad]) -> WorkerLoad:
        chosen = tied[self._turn[role] % len(tied)]
        self._turn[role] += 1
        return chosen
