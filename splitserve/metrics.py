"""Every Prometheus metric splitserve exports, named in one place.

Names carry the `splitserve_` prefix, a unit suffix (`_seconds`, `_tokens`) where there
is a unit, and `_total` on counters, so dashboards can be written from this file alone.
Each process (frontend, worker) builds its metrics into its own registry: two apps in one
test process must not collide in the global default registry.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from splitserve.engine.types import EngineStats

# --- frontend ---------------------------------------------------------------------------
REQUESTS_TOTAL = "splitserve_requests_total"
TIME_TO_FIRST_TOKEN_SECONDS = "splitserve_time_to_first_token_seconds"
INTER_TOKEN_LATENCY_SECONDS = "splitserve_inter_token_latency_seconds"
E2E_REQUEST_LATENCY_SECONDS = "splitserve_e2e_request_latency_seconds"
PROMPT_TOKENS_TOTAL = "splitserve_prompt_tokens_total"
GENERATION_TOKENS_TOTAL = "splitserve_generation_tokens_total"
ROUTER_DECISIONS_TOTAL = "splitserve_router_decisions_total"
ROUTER_OVERLAP_BLOCKS = "splitserve_router_overlap_blocks"
REQUESTS_MIGRATED_TOTAL = "splitserve_requests_migrated_total"
WORKERS = "splitserve_workers"
REQUESTS_QUEUED = "splitserve_requests_queued"
REQUEST_QUEUE_WAIT_SECONDS = "splitserve_request_queue_wait_seconds"
REQUESTS_REJECTED_TOTAL = "splitserve_requests_rejected_total"
LOCAL_PREFILL_TOTAL = "splitserve_local_prefill_total"

# --- worker (read from the engine's stats at scrape time) --------------------------------
NUM_REQUESTS_RUNNING = "splitserve_num_requests_running"
NUM_REQUESTS_WAITING = "splitserve_num_requests_waiting"
KV_BLOCKS_IN_USE = "splitserve_kv_blocks_in_use"
KV_BLOCKS_TOTAL = "splitserve_kv_blocks_total"
PREFIX_CACHE_QUERIES_TOTAL = "splitserve_prefix_cache_queries_total"
PREFIX_CACHE_HITS_TOTAL = "splitserve_prefix_cache_hits_total"
NUM_PREEMPTIONS_TOTAL = "splitserve_num_preemptions_total"
PROMPT_TOKENS_COMPUTED_TOTAL = "splitserve_prompt_tokens_computed_total"

# --- KV transfer (worker; D counts fetches, P counts what it sent and leases) ------------
KV_TRANSFERS_TOTAL = "splitserve_kv_transfers_total"
KV_TRANSFER_BYTES_TOTAL = "splitserve_kv_transfer_bytes_total"
KV_TRANSFER_SECONDS = "splitserve_kv_transfer_seconds"
KV_TRANSFER_RESUMES_TOTAL = "splitserve_kv_transfer_resumes_total"
KV_TRANSFER_CHECKSUM_FAILURES_TOTAL = "splitserve_kv_transfer_checksum_failures_total"
KV_TRANSFER_FALLBACKS_TOTAL = "splitserve_kv_transfer_fallbacks_total"
KV_LEASE_EXPIRED_TOTAL = "splitserve_kv_lease_expired_total"
KV_BLOCKS_PINNED = "splitserve_kv_blocks_pinned"
KV_PREFILLS_CANCELLED_TOTAL = "splitserve_kv_prefills_cancelled_total"
KV_AUTH_FAILURES_TOTAL = "splitserve_kv_auth_failures_total"
WORKER_API_UNAUTHORIZED_TOTAL = "splitserve_worker_api_unauthorized_total"

# Prompt blocks already cached on the chosen prefill worker: 0 (a miss) up to a 131k-token
# prompt's 8192 blocks of 16 tokens.
_OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

# Latency buckets span a fast CPU decode step (ms) to a long-context prefill (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class FrontendMetrics:
    """The frontend's request-level metrics, registered into `registry`."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            REQUESTS_TOTAL, "OpenAI API requests by outcome: the HTTP status returned, "
            "499 when the client went away first", ["status"], registry=registry)
        self.time_to_first_token = Histogram(
            TIME_TO_FIRST_TOKEN_SECONDS, "Request arrival to first generated token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            INTER_TOKEN_LATENCY_SECONDS, "Time between consecutive generated tokens",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e_request_latency = Histogram(
            E2E_REQUEST_LATENCY_SECONDS, "Request arrival to last generated token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(
            PROMPT_TOKENS_TOTAL, "Prompt tokens of accepted requests", registry=registry)
        self.generation_tokens = Counter(
            GENERATION_TOKENS_TOTAL, "Generated tokens", registry=registry)
        self.router_decisions = Counter(
            ROUTER_DECISIONS_TOTAL, "Workers chosen by the router, by policy and by the role "
            "the worker was chosen for (prefill, decode, both)", ["policy", "role"],
            registry=registry)
        self.router_overlap_blocks = Histogram(
            ROUTER_OVERLAP_BLOCKS, "Prompt KV blocks already cached on the worker chosen to "
            "compute the prompt (kv policy; 0 for the others)", buckets=_OVERLAP_BUCKETS,
            registry=registry)
        self.requests_migrated = Counter(
            REQUESTS_MIGRATED_TOTAL, "Requests moved to another decode worker mid-stream "
            "because theirs was lost (one count per move)", registry=registry)
        self.requests_queued = Gauge(
            REQUESTS_QUEUED, "Requests waiting in the frontend's admission queue (no worker "
            "could take them yet)", registry=registry)
        self.request_queue_wait = Histogram(
            REQUEST_QUEUE_WAIT_SECONDS, "Time requests spent in the admission queue, observed "
            "when they leave it (admitted, timed out, or the client left)",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.requests_rejected = Counter(
            REQUESTS_REJECTED_TOTAL, "Requests refused for lack of capacity, by reason "
            "(queue_full: 429; queue_timeout, no_worker: 503)", ["reason"], registry=registry)
        self.local_prefill = Counter(
            LOCAL_PREFILL_TOTAL, "Requests whose prompt a decode worker computed itself by the "
            "prefill overflow policy, by reason (no_prefill_worker, prefill_saturated)",
            ["reason"], registry=registry)
        self._worker_labels: set[tuple[str, str]] = set()
        self.workers = Gauge(
            WORKERS, "Workers the frontend knows, by role and state (ready, loading, failed, "
            "unreachable)", ["role", "state"], registry=registry)

    def set_workers(self, counts: dict[tuple[str, str], int]) -> None:
        """Replace the worker gauge with `counts` ((role, state) -> workers). Every label set
        seen before stays exported (at 0 if now empty), so a dashboard sees a drop to zero
        rather than a series that vanished."""
        for labels in list(self._worker_labels):
            self.workers.labels(*labels).set(counts.get(labels, 0))
        for labels, n in counts.items():
            self._worker_labels.add(labels)
            self.workers.labels(*labels).set(n)


class EngineStatsCollector(Collector):
    """Exports the latest EngineStats snapshot on each scrape.

    The engine keeps cumulative counts itself, so the counters here are read, not
    incremented: there is exactly one source of truth for each number.
    """

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self._stats = stats

    def collect(self) -> Iterable:
        s = self._stats()
        if s is None:  # still loading: export nothing rather than misleading zeros
            return
        yield GaugeMetricFamily(NUM_REQUESTS_RUNNING, "Requests in the running batch",
                                value=s.num_requests_running)
        yield GaugeMetricFamily(NUM_REQUESTS_WAITING, "Requests queued for scheduling",
                                value=s.num_requests_waiting)
        yield GaugeMetricFamily(KV_BLOCKS_IN_USE, "KV cache blocks referenced by live requests",
                                value=s.kv_blocks_in_use)
        yield GaugeMetricFamily(KV_BLOCKS_TOTAL, "KV cache blocks in the pool",
                                value=s.kv_blocks_total)
        yield CounterMetricFamily(PREFIX_CACHE_QUERIES_TOTAL,
                                  "Prompt tokens looked up in the prefix cache",
                                  value=s.prefix_cache_queries_tokens)
        yield CounterMetricFamily(PREFIX_CACHE_HITS_TOTAL,
                                  "Prompt tokens found in the prefix cache",
                                  value=s.prefix_cache_hits_tokens)
        yield CounterMetricFamily(NUM_PREEMPTIONS_TOTAL,
                                  "Requests preempted (KV freed, recomputed later)",
                                  value=s.num_preemptions)
        yield CounterMetricFamily(PROMPT_TOKENS_COMPUTED_TOTAL,
                                  "Prompt tokens this engine computed (not cached, not transferred)",
                                  value=s.num_computed_prompt_tokens)


class TransferStatsCollector(Collector):
    """Exports the KV data plane's counters (splitserve.transfer.config.TransferStats),
    which the transfer threads keep; read at scrape time like the engine's."""

    def __init__(self, stats):
        self._stats = stats

    def collect(self) -> Iterable:
        s = self._stats.snapshot()
        transfers = CounterMetricFamily(KV_TRANSFERS_TOTAL, "KV fetches by outcome (decode side)",
                                        labels=["outcome"])
        for outcome, n in sorted(s["transfers"].items()):
            transfers.add_metric([outcome], n)
        yield transfers
        fallbacks = CounterMetricFamily(
            KV_TRANSFER_FALLBACKS_TOTAL, "KV fetches that ended in the fallback policy, by reason",
            labels=["reason"])
        for reason, n in sorted(s["fallbacks"].items()):
            fallbacks.add_metric([reason], n)
        yield fallbacks
        moved = CounterMetricFamily(KV_TRANSFER_BYTES_TOTAL,
                                    "KV payload bytes received (decode) or sent (prefill)",
                                    labels=["direction"])
        moved.add_metric(["received"], s["bytes_received"])
        moved.add_metric(["sent"], s["bytes_sent"])
        yield moved
        yield CounterMetricFamily(KV_TRANSFER_RESUMES_TOTAL,
                                  "KV sessions re-established mid-transfer (resume, no recompute)",
                                  value=s["resumes"])
        yield CounterMetricFamily(KV_TRANSFER_CHECKSUM_FAILURES_TOTAL,
                                  "KV frames whose xxh3 checksum failed (range re-sent)",
                                  value=s["checksum_failures"])
        yield CounterMetricFamily(KV_LEASE_EXPIRED_TOTAL,
                                  "Pinned KV released because the decode worker went silent",
                                  value=s["lease_expired"])
        yield GaugeMetricFamily(KV_BLOCKS_PINNED, "KV blocks pinned for decode workers (prefill side)",
                                value=s["blocks_pinned"])
        yield CounterMetricFamily(KV_PREFILLS_CANCELLED_TOTAL,
                                  "Prefills a decode worker gave up on, dropped here (prefill side)",
                                  value=s["prefills_cancelled"])
        yield CounterMetricFamily(KV_AUTH_FAILURES_TOTAL,
                                  "KV sessions refused for a missing or wrong secret (prefill side)",
                                  value=s["auth_failures"])


class WorkerMetrics:
    """A worker's registry: engine and transfer numbers read at scrape time, plus the
    transfer-duration histogram observed as fetches end."""

    def __init__(self, stats: Callable[[], EngineStats | None], transfer_stats=None):
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(stats))
        if transfer_stats is not None:
            self.registry.register(TransferStatsCollector(transfer_stats))
        self.kv_transfer_seconds = Histogram(
            KV_TRANSFER_SECONDS, "Duration of KV fetches, any outcome (decode side)",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.api_unauthorized = Counter(
            WORKER_API_UNAUTHORIZED_TOTAL.removesuffix("_total"),
            "Worker API requests refused for lacking the deployment's secret",
            registry=self.registry)
