"""The transfer counters (TransferStats) on vLLM's own /metrics, under the same
`splitserve_kv_*` names our workers export (splitserve/metrics.py).

Each worker's connector sends what changed since its last report (get_kv_connector_stats);
vLLM sums the ranks' reports (aggregate) and hands them to the API server process, where
SplitservePromMetrics adds them to counters labelled like vLLM's own (model_name, engine)
and each load's duration to splitserve_kv_transfer_seconds. Two lists ride along, new
items only, concatenated over ranks: `fetches` (one report per ended load: transfer id,
outcome, prompt tokens arrived, seconds) and `incidents` ((kind, request id, reason,
detail, peer), as TransferStats.incident takes them). A splitserve vLLM worker reads
both (worker/vllm_kv_transfer.py): its request's done line, its /incidents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)
from vllm.v1.metrics.utils import create_metric_per_engine

from splitserve import metrics as names
from splitserve.transfer.config import SCALAR_FIELDS, TransferStats

_BY_LABEL = ("transfers", "fallbacks")
_LISTS = ("fetches", "incidents")


@dataclass
class SplitserveKVStats(KVConnectorStats):
    """data: the TransferStats snapshot fields; `transfers`/`fallbacks` by outcome; the
    `fetches` and `incidents` lists."""

    @classmethod
    def zero(cls) -> "SplitserveKVStats":
        return cls(data={**{k: 0 for k in SCALAR_FIELDS}, **{k: {} for k in _BY_LABEL},
                         **{k: [] for k in _LISTS}})

    @classmethod
    def of(cls, stats: TransferStats, fetches: list[dict] = (),
           incidents: list[list[str]] = ()) -> "SplitserveKVStats":
        s = stats.snapshot()
        return cls(data={**{k: s[k] for k in SCALAR_FIELDS + _BY_LABEL}, "fetches": list(fetches),
                         "incidents": list(incidents)})

    def _combine(self, other: "SplitserveKVStats", sign: int) -> "SplitserveKVStats":
        a, b = self.data, other.data
        out: dict[str, Any] = {k: a.get(k, 0) + sign * b.get(k, 0) for k in SCALAR_FIELDS}
        for k in _BY_LABEL:
            labels = set(a.get(k, {})) | set(b.get(k, {}))
            d = {lab: a.get(k, {}).get(lab, 0) + sign * b.get(k, {}).get(lab, 0) for lab in labels}
            out[k] = {lab: n for lab, n in d.items() if n}
        for k in _LISTS:       # new items only: a sum concatenates, a difference keeps ours
            out[k] = a.get(k, []) + (b.get(k, []) if sign > 0 else [])
        return SplitserveKVStats(data=out)

    def minus(self, other: "SplitserveKVStats") -> "SplitserveKVStats":
        """The counters' change since `other`; the lists are this report's."""
        return self._combine(other, -1)

    def aggregate(self, other: KVConnectorStats) -> "SplitserveKVStats":
        assert isinstance(other, SplitserveKVStats)
        return self._combine(other, 1)

    def reset(self) -> None:
        self.data = SplitserveKVStats.zero().data

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: d.get(k, 0) for k in SCALAR_FIELDS}
        for k in _BY_LABEL:
            out.update({f"{k}_{lab}": n for lab, n in sorted(d.get(k, {}).items())})
        return out

    def is_empty(self) -> bool:
        d = self.data
        return not any(d.get(k) for k in SCALAR_FIELDS + _BY_LABEL + _LISTS)


class SplitservePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._labelnames = list(labelnames)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()):
            # prometheus_client adds `_total` itself: the names in metrics.py carry it.
            return self._counter_cls(name=name.removesuffix("_total"), documentation=doc,
                                     labelnames=self._labelnames + list(extra))

        self.transfers = counter(names.KV_TRANSFERS_TOTAL, "KV fetches by outcome (decode side)",
                                 ("outcome",))
        self.fallbacks = counter(names.KV_TRANSFER_FALLBACKS_TOTAL,
                                 "KV fetches that ended in the fallback policy, by reason",
                                 ("reason",))
        self.bytes = counter(names.KV_TRANSFER_BYTES_TOTAL,
                             "KV payload bytes received (decode) or sent (prefill)", ("direction",))
        scalar = {
            "resumes": (names.KV_TRANSFER_RESUMES_TOTAL,
                        "KV sessions re-established mid-transfer (resume, no recompute)"),
            "checksum_failures": (names.KV_TRANSFER_CHECKSUM_FAILURES_TOTAL,
                                  "KV frames whose xxh3 checksum failed (range re-sent)"),
            "lease_expired": (names.KV_LEASE_EXPIRED_TOTAL,
                              "Pinned KV released because the decode worker went silent"),
            "prefills_cancelled": (names.KV_PREFILLS_CANCELLED_TOTAL,
                                   "Prefills a decode worker gave up on, dropped here (prefill side)"),
            "auth_failures": (names.KV_AUTH_FAILURES_TOTAL,
                              "KV sessions refused for a missing or wrong secret (prefill side)"),
        }
        self.scalars = {k: create_metric_per_engine(counter(n, doc), per_engine_labelvalues)
                        for k, (n, doc) in scalar.items()}
        self.seconds = create_metric_per_engine(self._histogram_cls(
            name=names.KV_TRANSFER_SECONDS, documentation="Duration of KV loads, any outcome "
            "(decode side; one per tensor-parallel rank)", buckets=names.LATENCY_BUCKETS,
            labelnames=self._labelnames), per_engine_labelvalues)
        pinned = self._gauge_cls(name=names.KV_BLOCKS_PINNED,
                                 documentation="KV blocks pinned for decode workers (prefill side)",
                                 labelnames=self._labelnames)
        self.pinned = create_metric_per_engine(pinned, per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        base = list(self.per_engine_labelvalues[engine_idx])
        for outcome, n in d.get("transfers", {}).items():
            self.transfers.labels(*base, outcome).inc(n)
        for reason, n in d.get("fallbacks", {}).items():
            self.fallbacks.labels(*base, reason).inc(n)
        for direction, key in (("received", "bytes_received"), ("sent", "bytes_sent")):
            if d.get(key):
                self.bytes.labels(*base, direction).inc(d[key])
        for key, metric in self.scalars.items():
            if d.get(key):
                metric[engine_idx].inc(d[key])
        for fetch in d.get("fetches", []):
            self.seconds[engine_idx].observe(fetch["seconds"])
        if d.get("blocks_pinned"):
            self.pinned[engine_idx].inc(d["blocks_pinned"])
