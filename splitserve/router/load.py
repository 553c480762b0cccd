"""What a routing policy knows about a worker's load: a typed snapshot the frontend fills
from discovery records (and its own in-flight accounting, see inflight.py)."""

from __future__ import annotations

import msgspec

from splitserve.discovery.record import WorkerRecord


class WorkerLoad(msgspec.Struct, frozen=True, kw_only=True):
    """kv_blocks_total == 0 means the worker has not reported its capacity yet: policies
    then treat its capacity as unknown rather than full."""

    worker_id: str
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_pending_prefill_tokens: int = 0
    prefill_tokens_per_s: float = 0.0       # measured by the worker; 0: not yet
    kv_blocks_in_use: int = 0
    kv_blocks_total: int = 0

    @property
    def num_requests(self) -> int:
        return self.num_requests_running + self.num_requests_waiting

    @property
    def kv_blocks_free(self) -> int:
        return max(self.kv_blocks_total - self.kv_blocks_in_use, 0)

    @property
    def expected_prefill_wait_s(self) -> float | None:
        """How long a new prompt would wait behind the prefill work queued here; None while
        the worker's rate is unknown (then it is not judged saturated)."""
        if self.prefill_tokens_per_s <= 0:
            return None
        return self.num_pending_prefill_tokens / self.prefill_tokens_per_s

    @classmethod
    def from_record(cls, record: WorkerRecord) -> "WorkerLoad":
        return cls(worker_id=record.worker_id,
                   num_requests_running=record.num_requests_running,
                   num_requests_waiting=record.num_requests_waiting,
                   num_pending_prefill_tokens=record.num_pending_prefill_tokens,
                   prefill_tokens_per_s=record.prefill_tokens_per_s,
                   kv_blocks_in_use=record.kv_blocks_in_use,
                   kv_blocks_total=record.kv_blocks_total)
