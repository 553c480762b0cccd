"""Typed configuration, outcomes and counters of the KV data plane.

The engine/worker maps these onto CLI flags (`--kv-stall-timeout`, `--kv-lease`,
`--kv-transport`, `--kv-secret`) and onto Prometheus metrics; nothing here imports them.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from splitserve.config import ConfigError

TRANSPORTS = ("auto", "tcp", "shm")


@dataclass(frozen=True)
class TransferConfig:
    stall_timeout: float = 30.0        # D: P silent (no frame at all) this long => P is dead
    # D: P alive (PROGRESS keeps coming) but this request queued or not advancing this long
    # => give up on P (CANCEL: P drops it) and apply the fallback policy. Separate from the
    # stall timeout: a busy prefill worker is not a dead one.
    busy_timeout: float = 300.0
    lease: float = 30.0                # P: unpin a request's blocks after this long without ACK/HEARTBEAT
    heartbeat_interval: float = 5.0    # both: say something (HEARTBEAT / PROGRESS) after this long quiet
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0    # P: a connection that has not finished the handshake is dropped
    max_pending_handshakes: int = 64   # P: unauthenticated connections held at once; more are closed
    reconnect_attempts: int = 5        # consecutive reconnects without a newly verified block
    reconnect_backoff: float = 0.05    # first pause before reconnecting; doubles, capped at 2 s
    max_checksum_failures: int = 16    # per transfer; beyond this P's data is deemed corrupt
    frame_bytes: int = 8 << 20         # max BLOCKS payload (always at least one block)
    chunk_bytes: int = 1 << 20         # copy/hash granularity: hash while the chunk is in cache
    socket_buffer: int = 4 << 20       # SO_SNDBUF / SO_RCVBUF (the kernel may cap it)
    shm_ring_bytes: int = 32 << 20     # per-connection shared-memory ring (shm transport)
    max_header_bytes: int = 16 << 20
    transport: str = "auto"            # auto: shm when P and D share a host, else tcp
    secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("stall_timeout", "busy_timeout", "lease", "heartbeat_interval",
                     "connect_timeout", "handshake_timeout", "reconnect_backoff"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_interval * 2 > self.lease:
            raise ConfigError(f"heartbeat_interval ({self.heartbeat_interval}) must be at most "
                              f"half the lease ({self.lease}) so one lost heartbeat is survivable")
        if self.heartbeat_interval * 2 > self.stall_timeout:
            raise ConfigError(f"heartbeat_interval ({self.heartbeat_interval}) must be at most "
                              f"half the stall timeout ({self.stall_timeout}): the prefill "
                              "worker's PROGRESS heartbeats are what tell it apart from a dead one")
        if self.max_pending_handshakes < 1:
            raise ConfigError(f"max_pending_handshakes must be >= 1, got {self.max_pending_handshakes}")
        if self.reconnect_attempts < 0 or self.max_checksum_failures < 0:
            raise ConfigError("reconnect_attempts and max_checksum_failures must be >= 0")
        for name in ("frame_bytes", "chunk_bytes", "socket_buffer", "shm_ring_bytes",
                     "max_header_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.secret is not None and not self.secret:
            raise ConfigError("secret must be non-empty when given")


class Outcome(str, enum.Enum):
    """How one fetch ended. Everything except OK and CANCELLED is a fallback reason."""

    OK = "ok"
    PEER_DEAD = "peer_dead"                  # P unreachable, or P lost the request (restart, lease)
    STALLED = "stalled"                      # P silent (no frame at all) for stall_timeout
    BUSY = "busy"                            # P alive, request not advancing for busy_timeout
    CANCELLED = "cancelled"                  # D gave up: the request was aborted (client gone)
    REFUSED = "refused"                      # P declined the request (bad request, transport)
    MISMATCH = "mismatch"                    # protocol version or model/layout fingerprint differ
    AUTH_FAILED = "auth_failed"              # shared secret missing or wrong (either side)
    PEER_ERROR = "peer_error"                # P's prefill failed and P said so
    PROTOCOL_ERROR = "protocol_error"        # P sent something out of bounds or out of order
    CORRUPT = "corrupt"                      # too many checksum failures
    RETRIES_EXHAUSTED = "retries_exhausted"  # connection kept breaking without progress


@dataclass(frozen=True)
class FetchResult:
    outcome: Outcome
    reason: str
    blocks_verified: int        # logical blocks [0, n) are in D's KV with a good checksum
    first_token: int | None     # set only when outcome is OK
    bytes: int                  # payload bytes received (resends included)
    resumes: int                # sessions re-established mid-transfer
    checksum_failures: int
    seconds: float
    transport: str
    first_logprobs: object = None   # protocol.FirstTokenLogprobs, when OK and asked for

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def fallback(self) -> bool:
        """The request still needs its prompt computed (not OK, not cancelled)."""
        return self.outcome not in (Outcome.OK, Outcome.CANCELLED)


class TransferStats:
    """Plain thread-safe counters; the worker exports them under its own metric names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.transfers: Counter[str] = Counter()        # by outcome
        self.fallbacks: Counter[str] = Counter()        # by reason (= non-ok outcome)
        self.bytes_received = 0
        self.bytes_sent = 0
        self.resumes = 0
        self.checksum_failures = 0
        self.lease_expired = 0
        self.prefills_cancelled = 0                     # P: requests D gave up on, dropped here
        self.auth_failures = 0                          # P: sessions refused for a bad proof
        self.seconds_sum = 0.0
        self.blocks_pinned = 0                          # P: blocks held for peers right now
        # (kind, request_id, reason, detail, peer) for each incident worth naming by
        # request: the worker keeps a bounded record (splitserve/worker/incidents.py).
        self.on_incident: Callable[[str, str, str, str, str], None] | None = None

    def incident(self, kind: str, request_id: str, reason: str, detail: str = "",
                 peer: str = "") -> None:
        if self.on_incident is not None:
            self.on_incident(kind, request_id, reason, detail, peer)

    def record_fetch(self, r: FetchResult) -> None:
        with self._lock:
            self.transfers[r.outcome.value] += 1
            if r.fallback:
                self.fallbacks[r.outcome.value] += 1
            self.bytes_received += r.bytes
            self.resumes += r.resumes
            self.checksum_failures += r.checksum_failures
            self.seconds_sum += r.seconds

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict:
        with self._lock:
            return {"transfers": dict(self.transfers), "fallbacks": dict(self.fallbacks),
                    "bytes_received": self.bytes_received, "bytes_sent": self.bytes_sent,
                    "resumes": self.resumes, "checksum_failures": self.checksum_failures,
                    "lease_expired": self.lease_expired, "seconds_sum": self.seconds_sum,
                    "prefills_cancelled": self.prefills_cancelled,
                    "auth_failures": self.auth_failures,
                    "blocks_pinned": self.blocks_pinned}
