"""What the frontend knows about each worker: its discovery record, its last health
state and its /info.

The route planner, the frontend's /health rule and GET /cluster all read these records;
only the WorkerClient writes them. A worker's /info (role, id, KV address) is kept while
the worker is down, so operators still see what it was and routing sees what is missing.
A worker whose discovery record disappears has no WorkerStatus at all.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import msgspec

from splitserve.discovery.record import WorkerRecord
from splitserve.router.load import WorkerLoad
from splitserve.worker import protocol as p


class WorkerState(str, enum.Enum):
    READY = "ready"
    LOADING = "loading"            # its model is still loading (its /health said so)
    FAILED = "failed"              # its engine failed (its /health said so)
    UNREACHABLE = "unreachable"    # no usable answer: not listening, connection lost, bad reply


@dataclass
class WorkerStatus:
    url: str                            # base URL of the worker's internal API
    state: WorkerState = WorkerState.UNREACHABLE
    reason: str | None = "not contacted yet"
    info: p.WorkerInfo | None = None    # the last /info it answered; None until it was ready once
    last_healthy: float | None = None   # wall-clock time of its last 200 /health
    # The latest discovery record: its load and heartbeat. State 'unknown' (a static list)
    # says nothing about the worker, so its role then comes from /info alone.
    record: WorkerRecord | None = None

    @property
    def ready(self) -> bool:
        # A worker that announced it failed takes no new requests, whatever its /health
        # said a poll ago.
        return self.state is WorkerState.READY and (
            self.record is None or self.record.state != "failed")

    @property
    def role(self) -> str | None:
        if self.info is not None:
            return self.info.role
        if self.record is not None and self.record.state != "unknown":
            return self.record.role
        return None

    @property
    def worker_id(self) -> str:
        """The worker's own id, or its URL for a worker that reports none."""
        return (self.info.worker_id if self.info is not None else "") or self.url

    def load(self) -> WorkerLoad:
        """Its load as its last discovery record reported it (zeros when none did)."""
        if self.record is None or self.record.state == "unknown":
            return WorkerLoad(worker_id=self.worker_id)
        return msgspec.structs.replace(WorkerLoad.from_record(self.record), worker_id=self.worker_id)

    @property
    def kv_address(self) -> tuple[str, int] | None:
        if self.info is None or self.info.kv_host is None or self.info.kv_port is None:
            return None
        return self.info.kv_host, self.info.kv_port

    @property
    def kv_endpoint(self) -> str | None:
        """The KV address as host:port text ([v6]:port), for logs and /cluster."""
        if self.kv_address is None:
            return None
        host, port = self.kv_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def set_ready(self, info: p.WorkerInfo) -> None:
        self.state, self.reason, self.info = WorkerState.READY, None, info
        self.last_healthy = time.time()

    def set_down(self, state: WorkerState, reason: str) -> None:
        self.state, self.reason = state, reason

    @property
    def state_name(self) -> str:
        """Its state for operators: the health state, unless its record says failed."""
        if self.state is WorkerState.READY and not self.ready:
            return self.record.state
        return self.state.value

    @property
    def why_not_ready(self) -> str | None:
        if self.state is WorkerState.READY and not self.ready:
            return f"its discovery record says {self.record.state}"
        return self.reason

    def describe(self) -> str:
        """One line for logs and 503 reasons: which worker, what it is, why it is not ready."""
        role = f" ({self.role})" if self.role else ""
        why = self.why_not_ready
        return f"worker {self.url}{role}: {self.state_name}" + (f": {why}" if why else "")

    def to_json(self) -> dict:
        """The worker's entry in GET /cluster. Load, KV usage, heartbeat and restarts (by
        its supervisor) come from the discovery record (None for workers that publish
        none, e.g. a static list)."""
        rec = self.record if self.record is not None and self.record.state != "unknown" else None
        return {"id": self.worker_id, "role": self.role, "api_url": self.url,
                "metrics_url": rec.metrics_url if rec else f"{self.url}/metrics",
                "kv_address": self.kv_endpoint,
                "state": self.state_name, "reason": self.why_not_ready,
                "last_healthy": self.last_healthy,
                "load": None if rec is None else {
                    "running": rec.num_requests_running, "waiting": rec.num_requests_waiting,
                    "pending_prefill_tokens": rec.num_pending_prefill_tokens,
                    "prefill_tokens_per_s": rec.prefill_tokens_per_s},
                "kv_usage": None if rec is None else {
                    "blocks_in_use": rec.kv_blocks_in_use, "blocks_total": rec.kv_blocks_total,
                    "fraction": round(rec.kv_usage, 4)},
                "last_heartbeat": None if rec is None else rec.last_heartbeat,
                "restarts": None if rec is None else rec.restarts}

