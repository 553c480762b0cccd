"""The routing interface: given the live candidates for a role and a request, pick one.

A real swap point (round-robin, random, kv), so it is an ABC. Policies are pure logic
over typed inputs; the frontend filters candidates (live, healthy, right role) and feeds
their loads. For an aggregated worker (role 'both') the frontend asks select_prefill:
its prefix cache decides how much of the prompt it must compute.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from splitserve.config import option
from splitserve.router.load import WorkerLoad

POLICIES = ("round-robin", "random", "kv")


@dataclass(frozen=True)
class RouterConfig:
    """overlap_weight: how many blocks of queued prefill work one cached prompt block is
    worth (kv policy). 1.0 treats computing a block and waiting behind one as equal;
    higher favours cache hits over balance. seed fixes the random policy's choices."""

    policy: str = option("kv", flag="--router", choices=POLICIES, help=(
        "how workers are picked: kv (prefill where the prompt's prefix is cached, weighed "
        "against queued work; decode by load and free KV), round-robin or random"))
    overlap_weight: float = option(1.0, flag="--kv-overlap-weight", metavar="W", help=(
        "kv router: blocks of queued prefill work one cached prompt block is worth"))
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router policy must be one of {POLICIES}, got {self.policy!r}")
        if not math.isfinite(self.overlap_weight) or self.overlap_weight < 0:
            raise ValueError(f"overlap_weight must be finite and >= 0, got {self.overlap_weight}")


@dataclass(frozen=True)
class RouteRequest:
    """block_hashes: the chained hashes of the prompt's full blocks (KVIndex.block_hashes)."""

    num_prompt_tokens: int
    block_hashes: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be >= 0, got {self.num_prompt_tokens}")


@dataclass(frozen=True)
class Decision:
    """The chosen worker; overlap_blocks: prompt blocks it already holds (kv policy, else
    0); cost: the policy's score of the choice (lower is better; None if it has none)."""

    worker_id: str
    overlap_blocks: int = 0
    cost: float | None = None


class RoutingPolicy(ABC):
    name: str

    @abstractmethod
    def select_prefill(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        """Pick the worker that computes the prompt (role prefill, or both)."""

    @abstractmethod
    def select_decode(self, workers: Sequence[WorkerLoad], request: RouteRequest) -> Decision:
        """Pick the worker that generates the answer (role decode)."""


def by_id(workers: Sequence[WorkerLoad], role: str) -> list[WorkerLoad]:
    """Candidates in a stable order (rotation and tie-breaks must not depend on the order
    discovery happened to list them in). The caller asks a policy only when it has a
    candidate (the frontend answers "no ready … worker" itself), so none is a bug: a
    ValueError naming the role rather than an IndexError deep in a policy."""
    if not workers:
        raise ValueError(f"a routing policy needs at least one {role} candidate")
    return sorted(workers, key=lambda w: w.worker_id)
