"""A worker's bounded in-memory record of its recent KV transfer incidents.

What `splitserve doctor` shows per worker: on a decode worker every fallback (by reason),
resume and checksum re-send, each with its request id, the prefill worker and the time;
on a prefill worker every lease expiry. The metrics count the same events; this record
says which requests they were. Bounded (the oldest go first), so a worker with a bad
link cannot grow its memory by failing; `counts` keeps the totals since start-up.
Thread-safe: fetch threads, the KV server's reaper and the event loop all record.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass

KINDS = ("fallback", "resume", "checksum", "lease_expired")
DEFAULT_CAPACITY = 256


@dataclass(frozen=True)
class Incident:
    kind: str
    request_id: str
    reason: str            # fallback: the outcome (peer_dead, stalled, …); else a short why
    detail: str            # the human-readable rest (the fetch's reason, counts)
    peer: str              # the other worker (prefill worker id on D), "" when unknown
    time: float            # wall clock (time.time()): read by doctor on another host

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"incident kind must be one of {KINDS}, got {self.kind!r}")


class IncidentLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._lock = threading.Lock()
        self._recent: deque[Incident] = deque(maxlen=capacity)
        self._counts: Counter[str] = Counter()     # "kind" and "kind:reason" since start

    def record(self, kind: str, request_id: str, reason: str, detail: str = "",
               peer: str = "") -> None:
        incident = Incident(kind, request_id, reason, detail, peer, time.time())
        with self._lock:
            self._recent.append(incident)
            self._counts[kind] += 1
            self._counts[f"{kind}:{reason}"] += 1

    def snapshot(self) -> dict:
        """Oldest first; `counts` are totals, `recent` holds at most `capacity`."""
        with self._lock:
            return {"capacity": self._recent.maxlen, "counts": dict(self._counts),
                    "recent": [asdict(i) for i in self._recent]}
