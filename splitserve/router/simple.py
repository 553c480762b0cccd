"""Load-blind policies: round-robin and random. Baselines for the kv policy, and the right
choice when prompts share nothing."""

from __future__ import annotations

import random
from typing import Sequence

from splitserve.router.load import WorkerLoad
from splitserve.router.policy import Decision, RouteRequest, RoutingPolicy, by_id


class RoundRobinPolicy(RoutingPolicy):
    """Each role cycles through its candidates in worker-id order."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turn = {"prefill": 0, "decode": 0}

    def _next(self, role: str, workers: Sequence[WorkerLoad]) -> Decision:
        ordered = by_id(workers, role)
        chosen = ordered[self._turn[role] % len(ordered)]
        self._turn[role] += 1
        return Decision(chosen.worker_id)

    def select_prefill(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        return self._next("prefill", workers)

    def select_decode(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        return self._next("decode", workers)


class RandomPolicy(RoutingPolicy):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select_prefill(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        return Decision(self._rng.choice(by_id(workers, "prefill")).worker_id)

    def select_decode(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        return Decision(self._rng.choice(by_id(workers, "decode")).worker_id)
