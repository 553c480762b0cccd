"""Which workers a request goes to, and whether the cluster can serve at all.

A request runs disaggregated whenever a usable pair exists: a ready decode worker D and
a ready prefill worker P that advertises a KV address. D receives the request naming P
and fetches the prompt's KV from it. Without such a pair a ready `both` worker serves it
aggregated, as before disaggregation existed.

`RoutePlanner` turns one choice of a splitserve.router policy (round-robin, random, kv:
P by cached prefix and queued prefill work, D by load and free KV) into the ordered
attempts a request makes, and keeps the frontend's in-flight account (InflightTracker)
that raises each worker's reported load to at least what this frontend sent it.

Workers report load in their discovery record every few seconds. A record written before
one of this frontend's requests left a worker's queue still counts that request, and
would push the next request with the same prefix away from the worker that has it
cached. So a record older than this frontend's latest finished work on that worker is
not trusted for load (only for capacity) until a newer one arrives; the in-flight
account covers the meantime. (Compared by wall clock with the worker's heartbeat time:
skew between hosts only delays or hastens trusting a record again.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from splitserve.frontend.workers import WorkerStatus
from splitserve.metrics import FrontendMetrics
from splitserve.router import InflightTracker, KVIndex, RouteRequest, RoutingPolicy, WorkerLoad
from splitserve.worker import protocol as p


@dataclass(frozen=True)
class Attempt:
    """Send the request to worker `worker_id` at `url`, naming `prefill` (None: aggregated,
    the worker computes the prompt itself). compute_worker_id is the worker that computes
    the prompt (P, or the worker itself), compute_tokens how much of it the router expects
    to be computed there (the rest is cached)."""

    url: str
    worker_id: str
    prefill: p.PrefillTarget | None
    compute_worker_id: str
    compute_tokens: int


def usable_prefill(workers: list[WorkerStatus]) -> list[WorkerStatus]:
    """Ready prefill workers a decode worker can fetch from (they advertise a KV address)."""
    return [w for w in workers if w.ready and w.role == "prefill" and w.kv_address is not None]


def ready_with_role(workers: list[WorkerStatus], role: str) -> list[WorkerStatus]:
    return [w for w in workers if w.ready and w.role == role]


def prefill_target(worker: WorkerStatus) -> p.PrefillTarget:
    host, port = worker.kv_address
    return p.PrefillTarget(worker_id=worker.worker_id, kv_host=host, kv_port=port)


class RoutePlanner:
    def __init__(self, policy: RoutingPolicy, index: KVIndex, metrics: FrontendMetrics):
        self.policy = policy
        self.index = index
        self.tracker = InflightTracker()
        self._metrics = metrics
        self._sent: dict[str, Attempt] = {}         # request id -> where it runs now
        self._settled_at: dict[str, float] = {}     # worker id -> when our work there last ended

    def route(self, request: p.GenerateRequest, workers: list[WorkerStatus]) -> list[Attempt]:
        """The attempts to make, in order: the policy's choice first, then the other
        candidates by id. The caller moves to the next one only when a worker could not
        take the request before producing anything (full, unreachable). The prefill worker
        stays the same across attempts: a full or lost D says nothing about P, and D falls
        back on its own when P fails. Empty when no worker can serve it."""
        prompt = request.prompt_token_ids
        route_request = RouteRequest(len(prompt), self.index.block_hashes(prompt))
        prefill, decode = usable_prefill(workers), ready_with_role(workers, "decode")
        if prefill and decode:
            p_worker, overlap = self._choose(prefill, "prefill", route_request)
            d_worker, _ = self._choose(decode, "decode", route_request)
            target = prefill_target(p_worker)
            compute = self._tokens_to_compute(len(prompt), overlap)
            return [Attempt(d.url, d.worker_id, target, p_worker.worker_id, compute)
                    for d in _chosen_first(d_worker, decode)]
        both = ready_with_role(workers, "both")
        if both:
            # The policies pick an aggregated worker as the one that computes the prompt:
            # its prefix cache decides how much work the request costs there.
            chosen, overlap = self._choose(both, "both", route_request)
            compute = self._tokens_to_compute(len(prompt), overlap)
            return [Attempt(w.url, w.worker_id, None, w.worker_id,
                            compute if w is chosen else len(prompt))
                    for w in _chosen_first(chosen, both)]
        return []

    def sent(self, request_id: str, attempt: Attempt, num_prompt_tokens: int) -> None:
        """The worker took the request: count it in flight until first_token / finished."""
        self._sent[request_id] = attempt
        self.tracker.prefill_started(request_id, attempt.compute_worker_id, attempt.compute_tokens)
        blocks = math.ceil((num_prompt_tokens + 1) / self.index.block_size)
        self.tracker.decode_started(request_id, attempt.worker_id, blocks)

    def first_token(self, request_id: str) -> None:
        self.tracker.prefill_finished(request_id)
        if (attempt := self._sent.get(request_id)) is not None:
            self._settled_at[attempt.compute_worker_id] = time.time()

    def finished(self, request_id: str) -> None:
        self.tracker.prefill_finished(request_id)
        self.tracker.decode_finished(request_id)
        if (attempt := self._sent.pop(request_id, None)) is not None:
            now = time.time()
            self._settled_at[attempt.compute_worker_id] = self._settled_at[attempt.worker_id] = now

    def _load(self, worker: WorkerStatus) -> WorkerLoad:
        load = worker.load()
        if worker.record is not None and \
                worker.record.last_heartbeat < self._settled_at.get(worker.worker_id, 0.0):
            return WorkerLoad(worker_id=load.worker_id, kv_blocks_total=load.kv_blocks_total)
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


def _chosen_first(chosen: WorkerStatus, pool: list[WorkerStatus]) -> list[WorkerStatus]:
    return [chosen] + sorted((w for w in pool if w is not chosen), key=lambda w: w.worker_id)


def unavailable_reason(workers: list[WorkerStatus]) -> str | None:
    """None when a request can be served (a usable P+D pair or a ready `both` worker);
    otherwise what is missing, then every worker that is not ready and why."""
    if (usable_prefill(workers) and ready_with_role(workers, "decode")) or \
            ready_with_role(workers, "both"):
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
    if not ready_with_role(workers, "decode"):
        missing.append("no ready decode worker")
    reason = f"{' and '.join(missing)}, and no ready both worker"
    return f"{reason} ({down})" if down else reason
