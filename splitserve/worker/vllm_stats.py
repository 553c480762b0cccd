"""vLLM's scheduler and iteration stats as splitserve's EngineStats.

Imports vLLM: only a vLLM worker loads this module (vllm_engine.py, once vLLM loads).
vLLM hands every engine step's stats to its stat loggers on the event loop (AsyncLLM's
output handler); this one keeps the latest as an EngineStats, with the cumulative counts
(prefix cache queries and hits, preemptions, computed prompt tokens) summed from vLLM's
per-step figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from splitserve.engine.types import EngineStats


class VllmStatsCollector(StatLoggerBase):
    """A per-engine stat logger: AsyncLLM builds it with (vllm_config, engine_index); bind
    on_stats first (functools.partial). on_stats(EngineStats) runs on the event loop, as
    does on_transfers(data): a KV connector's counters changed (its stats' data dict)."""

    def __init__(self, vllm_config, engine_index: int = 0, *,
                 on_stats: Callable[[EngineStats], None],
                 on_transfers: Callable[[dict[str, Any]], None] | None = None):
        self._cache_config = vllm_config.cache_config
        self._on_stats = on_stats
        self._on_transfers = on_transfers
        self._queries = self._hits = self._preemptions = self._computed = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if iteration_stats is not None:
            self._preemptions += iteration_stats.num_preempted_reqs
            self._computed += iteration_stats.prompt_token_stats.computed
        if scheduler_stats is None:
            return
        if scheduler_stats.kv_connector_stats and self._on_transfers is not None:
            self._on_transfers(scheduler_stats.kv_connector_stats)
        prefix = scheduler_stats.prefix_cache_stats
        self._queries += prefix.queries
        self._hits += prefix.hits
        total = self._cache_config.num_gpu_blocks or 0
        self._on_stats(EngineStats(
            num_requests_running=scheduler_stats.num_running_reqs,
            num_requests_waiting=scheduler_stats.num_waiting_reqs,
            kv_blocks_in_use=round(scheduler_stats.kv_cache_usage * total),
            kv_blocks_total=total,
            prefix_cache_queries_tokens=self._queries, prefix_cache_hits_tokens=self._hits,
            num_preemptions=self._preemptions, num_computed_prompt_tokens=self._computed))

    def log_engine_initialized(self) -> None:
        """vLLM calls this once the engine is up; the worker logs readiness itself."""
