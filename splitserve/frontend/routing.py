"""Which workers a request goes to, and whether the cluster can serve at all.

A request runs disaggregated whenever a usable pair exists: a ready decode worker D and
a ready prefill worker P that advertises a KV address and is not saturated. D receives
the request naming P and fetches the prompt's KV from it. Without such a pair a ready
`both` worker serves it aggregated, as before disaggregation existed.

Prefill overflow (FrontendConfig.prefill_overflow): a prefill worker is saturated when the
wait a new prompt can expect there (its pending prompt tokens, raised to what this
frontend sent it, / its measured prefill rate) exceeds max_prefill_wait_s (None: never
saturated). When no
prefill worker is ready, or all are saturated, and no `both` worker is ready, policy
`local` sends the request to a decode worker without a prefill target (D computes the
prompt itself; Attempt.local_prefill says why, and it is counted), policy `queue` names
no worker and the request waits in the admission queue (admission.py).

`RoutePlanner` turns one choice of a splitserve.router policy (round-robin, random, kv:
P by cached prefix and queued prefill work, D by load and free KV) into the ordered
attempts a request makes, and keeps the frontend's in-flight account (InflightTracker)
that raises each worker's reported load to at least what this frontend sent it, from
the moment an attempt starts (a decode worker holds the prompt's blocks while it waits
for the KV) until the request is refused, gets its first token or finishes.

Workers report load in their discovery record every few seconds. A record written before
one of this frontend's requests left a worker's queue still counts that request, and
would push the next request with the same prefix away from the worker that has it
cached. So a record older than this frontend's latest finished work on that worker is
not trusted for load (only for capacity and rate) until a newer one arrives; the
in-flight account covers the meantime. (Compared by wall clock with the worker's
heartbeat time: skew between hosts only delays or hastens trusting a record again.)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.frontend.workers import WorkerStatus
from splitserve.metrics import FrontendMetrics
from splitserve.router import InflightTracker, KVIndex, RouteRequest, RoutingPolicy, WorkerLoad
from splitserve.worker import protocol as p

logger = logging.getLogger(__name__)

LOCAL_PREFILL_REASONS = ("no_prefill_worker", "prefill_saturated")


@dataclass(frozen=True)
class Attempt:
    """Send the request to worker `worker_id` at `url`, naming `prefill` (None: the worker
    computes the prompt itself). compute_worker_id is the worker that computes the prompt
    (P, or the worker itself), compute_tokens how much of it the router expects to be
    computed there (the rest is cached). local_prefill: why a decode worker computes the
    prompt itself (one of LOCAL_PREFILL_REASONS), None otherwise."""

    url: str
    worker_id: str
    prefill: p.PrefillTarget | None
    compute_worker_id: str
    compute_tokens: int
    local_prefill: str | None = None


@dataclass(frozen=True)
class Route:
    """The attempts to make, in order; none (and why: `reason`) when no worker can take
    the request now."""

    attempts: list[Attempt] = field(default_factory=list)
    reason: str | None = None


def usable_prefill(workers: list[WorkerStatus]) -> list[WorkerStatus]:
    """Ready prefill workers a decode worker can fetch from (they advertise a KV address)."""
    return [w for w in workers if w.ready and w.role == "prefill" and w.kv_address is not None]


def ready_with_role(workers: list[WorkerStatus], role: str) -> list[WorkerStatus]:
    return [w for w in workers if w.ready and w.role == role]


def prefill_target(worker: WorkerStatus) -> p.PrefillTarget:
    host, port = worker.kv_address
    return p.PrefillTarget(worker_id=worker.worker_id, kv_host=host, kv_port=port)


class RoutePlanner:
    """overflow, max_prefill_wait_s: the prefill overflow policy (module doc). on_settle is
    called whenever work this frontend routed leaves a worker (first token, finish): the
    admission queue's cue that capacity may have been freed."""

    def __init__(self, policy: RoutingPolicy, index: KVIndex, metrics: FrontendMetrics,
                 overflow: str = "local", max_prefill_wait_s: float | None = None,
                 on_settle: Callable[[], None] | None = None):
        self.policy = policy
        self.index = index
        self.tracker = InflightTracker()
        self.overflow = overflow
        self.max_prefill_wait_s = max_prefill_wait_s
        self.local_prefills = dict.fromkeys(LOCAL_PREFILL_REASONS, 0)
        self._metrics = metrics
        self._on_settle = on_settle
        self._sent: dict[str, Attempt] = {}         # request id -> where it runs now
        self._settled_at: dict[str, float] = {}     # worker id -> when our work there last ended

    def route(self, request: p.GenerateRequest, workers: list[WorkerStatus]) -> Route:
        """The attempts to make, in order: the policy's choice first, then the other
        candidates by id. The caller moves to the next one only when a worker could not
        take the request before producing anything (full, unreachable). The prefill worker
        stays the same across attempts: a full or lost D says nothing about P, and D falls
        back on its own when P fails."""
        prompt = request.prompt_token_ids
        route_request = RouteRequest(len(prompt), self.index.block_hashes(prompt))
        prefill, decode = usable_prefill(workers), ready_with_role(workers, "decode")
        open_prefill, saturated = self._unsaturated(prefill)
        if open_prefill and decode:
            p_worker, overlap = self._choose(open_prefill, "prefill", route_request)
            d_worker, _ = self._choose(decode, "decode", route_request)
            target = prefill_target(p_worker)
            compute = self._tokens_to_compute(len(prompt), overlap)
            return Route([Attempt(d.url, d.worker_id, target, p_worker.worker_id, compute)
                          for d in _chosen_first(d_worker, decode)])
        both = ready_with_role(workers, "both")
        if both:
            # The policies pick an aggregated worker as the one that computes the prompt:
            # its prefix cache decides how much work the request costs there.
            chosen, overlap = self._choose(both, "both", route_request)
            compute = self._tokens_to_compute(len(prompt), overlap)
            return Route([Attempt(w.url, w.worker_id, None, w.worker_id,
                                  compute if w is chosen else len(prompt))
                          for w in _chosen_first(chosen, both)])
        if decode and self.overflow == "local":
            why = "prefill_saturated" if prefill else "no_prefill_worker"
            d_worker, _ = self._choose(decode, "decode", route_request)
            return Route([Attempt(d.url, d.worker_id, None, d.worker_id, len(prompt), why)
                          for d in _chosen_first(d_worker, decode)])
        if decode and prefill:
            return Route(reason=f"every ready prefill worker expects a wait above "
                                f"{self.max_prefill_wait_s:g}s ({saturated})")
        return Route(reason=unavailable_reason(workers, self.overflow == "local")
                     or "the route planner named no worker")

    def fits(self, request: p.GenerateRequest, workers: list[WorkerStatus]) -> bool:
        """Whether some worker is likely to take the request now, by the reported loads and
        what this frontend has in flight; asks no policy (nothing is chosen or counted).
        Only a disaggregated request can be refused for room: elsewhere the worker's
        engine queues it."""
        decode = ready_with_role(workers, "decode")
        if decode and self._unsaturated(usable_prefill(workers))[0]:
            needed = self._blocks(len(request.prompt_token_ids))
            loads = self.tracker.apply([self._load(w) for w in decode])
            return any(w.kv_blocks_total == 0 or w.kv_blocks_free >= needed for w in loads)
        return bool(ready_with_role(workers, "both")) or bool(decode and self.overflow == "local")

    def oversized(self, request: p.GenerateRequest, route: Route,
                  workers: list[WorkerStatus]) -> str | None:
        """Why no worker of `route` could ever hold the prompt's KV (each reported a pool
        smaller than the prompt), or None (also while any has not reported its pool)."""
        ids = {a.worker_id for a in route.attempts}
        totals = [w.load().kv_blocks_total for w in workers if w.worker_id in ids]
        needed = self._blocks(len(request.prompt_token_ids))
        if not totals or min(totals) == 0 or max(totals) >= needed:
            return None
        return (f"the prompt needs {needed} KV blocks of {self.index.block_size} tokens, but the "
                f"largest KV cache of the workers that could serve it holds {max(totals)}")

    def trying(self, request_id: str, attempt: Attempt, num_prompt_tokens: int) -> None:
        """An attempt starts: count it in flight on its workers until refused(),
        first_token() or finished()."""
        self._sent[request_id] = attempt
        self.tracker.prefill_started(request_id, attempt.compute_worker_id, attempt.compute_tokens)
        self.tracker.decode_started(request_id, attempt.worker_id, self._blocks(num_prompt_tokens + 1))

    def refused(self, request_id: str) -> None:
        """The attempt's worker did not take the request: it holds nothing of it."""
        self._sent.pop(request_id, None)
        self.tracker.prefill_finished(request_id)
        self.tracker.decode_finished(request_id)

    def sent(self, request_id: str, attempt: Attempt) -> None:
        """The worker took the request; counts a local prefill."""
        if attempt.local_prefill is not None:
            self.local_prefills[attempt.local_prefill] += 1
            self._metrics.local_prefill.labels(reason=attempt.local_prefill).inc()

    def first_token(self, request_id: str) -> None:
        self.tracker.prefill_finished(request_id)
        if (attempt := self._sent.get(request_id)) is not None:
            self._settled_at[attempt.compute_worker_id] = time.time()
        self._settled()

    def finished(self, request_id: str) -> None:
        self.tracker.prefill_finished(request_id)
        self.tracker.decode_finished(request_id)
        if (attempt := self._sent.pop(request_id, None)) is not None:
            now = time.time()
            self._settled_at[attempt.compute_worker_id] = self._settled_at[attempt.worker_id] = now
        self._settled()

    def _settled(self) -> None:
        if self._on_settle is not None:
            self._on_settle()

    def _unsaturated(self, prefill: list[WorkerStatus]) -> tuple[list[WorkerStatus], str]:
        """The prefill workers whose expected wait is within the limit (or unknown), and a
        description of the others' waits."""
        if self.max_prefill_wait_s is None:
            return prefill, ""
        loads = self.tracker.apply([self._load(w) for w in prefill])
        waits = {w.worker_id: w.expected_prefill_wait_s for w in loads}
        ok = [w for w in prefill if (waits[w.worker_id] or 0.0) <= self.max_prefill_wait_s]
        over = ", ".join(f"{wid}: {wait:.1f}s" for wid, wait in sorted(waits.items())
                         if (wait or 0.0) > self.max_prefill_wait_s)
        return ok, over

    def _load(self, worker: WorkerStatus) -> WorkerLoad:
        load = worker.load()
        record = worker.record
        if record is not None and (record.load_observed_at or record.last_heartbeat) \
                < self._settled_at.get(worker.worker_id, 0.0):
            return WorkerLoad(worker_id=load.worker_id, kv_blocks_total=load.kv_blocks_total,
                              prefill_tokens_per_s=load.prefill_tokens_per_s)
        return load

    def _choose(self, pool: list[WorkerStatus], role: str,
                request: RouteRequest) -> tuple[WorkerStatus, int]:
        loads = self.tracker.apply([self._load(w) for w in pool])
        if role == "decode":
            decision = self.policy.select_decode(loads, request)
        else:
            decision = self.policy.select_prefill(loads, request)
            self._metrics.router_overlap_blocks.observe(decision.overlap_blocks)
        self._metrics.router_decisions.labels(policy=self.policy.name, role=role).inc()
        return next(w for w in pool if w.worker_id == decision.worker_id), decision.overlap_blocks

    def _tokens_to_compute(self, num_prompt_tokens: int, overlap_blocks: int) -> int:
        return max(num_prompt_tokens - overlap_blocks * self.index.block_size, 0)

    def _blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.index.block_size)


def _chosen_first(chosen: WorkerStatus, pool: list[WorkerStatus]) -> list[WorkerStatus]:
    return [chosen] + sorted((w for w in pool if w is not chosen), key=lambda w: w.worker_id)


def unavailable_reason(workers: list[WorkerStatus], local_prefill: bool = True) -> str | None:
    """None when a request can be served: a usable P+D pair, a ready `both` worker, or
    (local_prefill: policy `local`) a ready decode worker alone, which then computes the
    prompt itself. Otherwise what is missing, then every worker that is not ready and why."""
    decode = ready_with_role(workers, "decode")
    if (decode and (local_prefill or usable_prefill(workers))) or ready_with_role(workers, "both"):
        return None
    if not workers:
        return "no worker is registered in discovery"
    down = "; ".join(w.describe() for w in workers if not w.ready)
    if not any(w.ready for w in workers):
        return f"no worker is ready ({down})"
    missing = []
    if not usable_prefill(workers):
        no_kv = [w.url for w in ready_with_role(workers, "prefill")]
        missing.append("no ready prefill worker" if not no_kv else
                       f"no ready prefill worker with a KV address ({', '.join(no_kv)} advertise none)")
    if not decode:
        missing.append("no ready decode worker")
    reason = f"{' and '.join(missing)}, and no ready both worker"
    return f"{reason} ({down})" if down else reason
