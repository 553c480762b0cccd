"""Which workers a request goes to, and whether the cluster can serve at all.

A request runs disaggregated whenever a usable pair exists: a ready decode worker D and
a ready prefill worker P that advertises a KV address. D receives the request naming P
and fetches the prompt's KV from it. Without such a pair a ready `both` worker serves it
aggregated, as before disaggregation existed.

`RoutePlanner` is the frontend's swap point: it turns a choice of workers into the
ordered attempts a request makes. `RoundRobinPlanner` is the default; a planner over a
router policy (splitserve.router: P by cached prefix, D by free capacity) replaces it.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from splitserve.frontend.workers import WorkerStatus
from splitserve.worker import protocol as p


@dataclass(frozen=True)
class Attempt:
    """Send the request to the worker at `url`, naming `prefill` (None: aggregated)."""

    url: str
    prefill: p.PrefillTarget | None


class RoutePlanner(ABC):
    @abstractmethod
    def route(self, request: p.GenerateRequest, workers: list[WorkerStatus]) -> list[Attempt]:
        """The attempts to make, in order: the caller moves to the next one only when a
        worker could not take the request before producing anything (full, unreachable).
        Empty when no worker can serve it."""


def usable_prefill(workers: list[WorkerStatus]) -> list[WorkerStatus]:
    """Ready prefill workers a decode worker can fetch from (they advertise a KV address)."""
    return [w for w in workers if w.ready and w.role == "prefill" and w.kv_address is not None]


def ready_with_role(workers: list[WorkerStatus], role: str) -> list[WorkerStatus]:
    return [w for w in workers if w.ready and w.role == role]


def prefill_target(worker: WorkerStatus) -> p.PrefillTarget:
    host, port = worker.kv_address
    return p.PrefillTarget(worker_id=worker.worker_id, kv_host=host, kv_port=port)


class RoundRobinPlanner(RoutePlanner):
    """P and D each in turn among the ready ones; on failure the remaining D in order.
    The prefill worker stays the same across attempts: a full or lost D says nothing
    about P, and D falls back on its own when P fails."""

    def __init__(self):
        self._turns = {role: itertools.count() for role in p.ROLES}

    def _rotated(self, role: str, pool: list[WorkerStatus]) -> list[WorkerStatus]:
        start = next(self._turns[role]) % len(pool)
        return pool[start:] + pool[:start]

    def route(self, request: p.GenerateRequest, workers: list[WorkerStatus]) -> list[Attempt]:
        prefill, decode = usable_prefill(workers), ready_with_role(workers, "decode")
        if prefill and decode:
            target = prefill_target(self._rotated("prefill", prefill)[0])
            return [Attempt(d.url, target) for d in self._rotated("decode", decode)]
        both = ready_with_role(workers, "both")
        if both:
            return [Attempt(w.url, None) for w in self._rotated("both", both)]
        return []


def unavailable_reason(workers: list[WorkerStatus]) -> str | None:
    """None when a request can be served (a usable P+D pair or a ready `both` worker);
    otherwise what is missing, then every worker that is not ready and why."""
    if (usable_prefill(workers) and ready_with_role(workers, "decode")) or \
            ready_with_role(workers, "both"):
        return None
    down = "; ".join(w.describe() for w in workers if not w.ready)
    if not any(w.ready for w in workers):
        return f"no worker is ready ({down})"
    missing = []
    if not usable_prefill(workers):
        no_kv = [w.url for w in ready_with_role(workers, "prefill")]
        missing.append("no ready prefill worker" if not no_kv else
                       f"no ready prefill worker with a KV address ({', '.join(no_kv)} advertise none)")
    if not ready_with_role(workers, "decode"):
        missing.append("no ready decode worker")
    reason = f"{' and '.join(missing)}, and no ready both worker"
    return f"{reason} ({down})" if down else reason
