"""What the frontend knows about each worker: its last health state and its /info.

The route planner, the frontend's /health rule and GET /cluster all read these records;
only the WorkerClient writes them. A worker's /info (role, id, KV address) is kept while
the worker is down, so operators still see what it was and routing sees what is missing.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

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

    @property
    def ready(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def role(self) -> str | None:
        return None if self.info is None else self.info.role

    @property
    def worker_id(self) -> str:
        """The worker's own id, or its URL for a worker that reports none."""
        return (self.info.worker_id if self.info is not None else "") or self.url

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

    def describe(self) -> str:
        """One line for logs and 503 reasons: which worker, what it is, why it is not ready."""
        role = f" ({self.role})" if self.role else ""
        return f"worker {self.url}{role}: {self.state.value}" + (f": {self.reason}" if self.reason else "")

    def to_json(self) -> dict:
        """The worker's entry in GET /cluster."""
        return {"id": self.worker_id, "role": self.role, "api_url": self.url,
                "metrics_url": f"{self.url}/metrics",
                "kv_address": self.kv_endpoint,
                "state": self.state.value, "reason": self.reason,
                "last_healthy": self.last_healthy}

