"""What discovery stores about a worker, and the changes a watcher sees.

Records cross processes and machines (files, etcd values), so they are msgspec Structs
with an explicit JSON codec: unknown fields rejected, types checked on decode. The same
record feeds routing (role, addresses, load) and the frontend's /cluster view.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

Role = Literal["prefill", "decode", "both"]
# loading: registered, model not ready yet; ready: takes requests; failed: up but
# unusable (the reason is in its /health); unknown: discovery cannot tell (static
# lists) — the caller health-checks. A worker that shuts down cleanly withdraws its
# record instead of announcing a state.
State = Literal["loading", "ready", "failed", "unknown"]


class WorkerRecord(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One worker as discovery knows it.

    last_heartbeat: wall-clock seconds (time.time()) when its worker last wrote this
    record. Wall clock, not monotonic, because readers live in other processes; a reader
    only compares it with a TTL of seconds, so ordinary clock skew does not matter.
    """

    worker_id: str
    role: Role
    api_url: str
    metrics_url: str
    model_name: str                  # empty when discovery cannot know it (static lists)
    kv_host: str | None = None       # where a prefill worker serves KV; None for others
    kv_port: int | None = None
    state: State = "loading"
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    # Prompt tokens admitted but not yet computed: the prefill work queued ahead of a new
    # request, which the kv router weighs against the blocks that request must compute.
    num_pending_prefill_tokens: int = 0
    # Prompt tokens per second it computed while it had prefill work (0: not measured
    # yet): pending tokens / this rate is the wait a new prompt can expect there.
    prefill_tokens_per_s: float = 0.0
    kv_blocks_in_use: int = 0
    kv_blocks_total: int = 0
    last_heartbeat: float = 0.0
    # Wall-clock seconds when the load fields above were read (0: not said; readers then
    # take last_heartbeat). A store's keep-alive rewrites the last record with a fresh
    # last_heartbeat, so a load read mid-prefill can look newer than it is.
    load_observed_at: float = 0.0
    # How many times its supervisor (`splitserve serve`) restarted it after a crash; the
    # restarted process registers under the same worker_id, replacing the record.
    restarts: int = 0

    def __post_init__(self) -> None:
        # Decoding runs this too, so a malformed record from another process is refused
        # at the boundary instead of reaching the router.
        if not self.worker_id or "/" in self.worker_id:
            raise ValueError(f"worker_id must be non-empty and contain no '/', got {self.worker_id!r}")
        if (self.kv_host is None) != (self.kv_port is None):
            raise ValueError("kv_host and kv_port must be given together")
        if self.kv_port is not None and not 0 < self.kv_port < 65536:
            raise ValueError(f"kv_port must be in 1..65535, got {self.kv_port}")
        if min(self.num_requests_running, self.num_requests_waiting,
               self.num_pending_prefill_tokens, self.kv_blocks_in_use, self.kv_blocks_total) < 0:
            raise ValueError("load counters must be non-negative")
        if not math.isfinite(self.prefill_tokens_per_s) or self.prefill_tokens_per_s < 0:
            raise ValueError(f"prefill_tokens_per_s must be finite and >= 0, got {self.prefill_tokens_per_s}")
        if self.restarts < 0:
            raise ValueError(f"restarts must be non-negative, got {self.restarts}")

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache in use; 0.0 while the worker has not reported it."""
        return self.kv_blocks_in_use / self.kv_blocks_total if self.kv_blocks_total else 0.0


class WatchEvent(msgspec.Struct, frozen=True):
    """A change seen by a watcher. kind 'put': the worker appeared or its record changed
    (record is the new one); 'delete': it is gone (deregistered, lease lapsed or heartbeat
    expired) and record is None."""

    kind: Literal["put", "delete"]
    worker_id: str
    record: WorkerRecord | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkerRecord)


def encode_record(record: WorkerRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes | str) -> WorkerRecord:
    """Raises msgspec.ValidationError / msgspec.DecodeError on a malformed record."""
    return _decoder.decode(data)
