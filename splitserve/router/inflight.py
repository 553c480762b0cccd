"""The frontend's own account of the work it has routed and not yet seen finish.

Workers report load every heartbeat, so between two reports a burst of requests would
all see the same stale numbers and pile onto one worker. The frontend knows exactly what
it sent where, the moment it sends it; each worker's report knows what *other* frontends
sent. Both are lower bounds of the true load, so a policy sees the larger of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import msgspec

from splitserve.router.load import WorkerLoad


@dataclass
class _Routed:
    worker_id: str
    prefill_tokens: int = 0     # prompt tokens still to compute (0 once prefill is done)
    decode_blocks: int = 0      # KV blocks held on a decode worker (0 for prefill)


class InflightTracker:
    def __init__(self) -> None:
        self._prefill: dict[str, _Routed] = {}
        self._decode: dict[str, _Routed] = {}

    def prefill_started(self, request_id: str, worker_id: str, num_tokens_to_compute: int) -> None:
        self._prefill[request_id] = _Routed(worker_id, prefill_tokens=num_tokens_to_compute)

    def prefill_finished(self, request_id: str) -> None:
        """Its first token arrived, or it failed: either way no prefill work remains."""
        self._prefill.pop(request_id, None)

    def decode_started(self, request_id: str, worker_id: str, num_blocks: int) -> None:
        self._decode[request_id] = _Routed(worker_id, decode_blocks=num_blocks)

    def decode_finished(self, request_id: str) -> None:
        self._decode.pop(request_id, None)

    def apply(self, loads: Sequence[WorkerLoad]) -> list[WorkerLoad]:
        """`loads` as reported, each raised to at least what this frontend has in flight
        on that worker."""
        tokens: dict[str, int] = {}
        blocks: dict[str, int] = {}
        # Sets: on an aggregated worker one request is both prefilling and decoding.
        requests: dict[str, set[str]] = {}
        for request_id, routed in self._prefill.items():
            tokens[routed.worker_id] = tokens.get(routed.worker_id, 0) + routed.prefill_tokens
            requests.setdefault(routed.worker_id, set()).add(request_id)
        for request_id, routed in self._decode.items():
            blocks[routed.worker_id] = blocks.get(routed.worker_id, 0) + routed.decode_blocks
            requests.setdefault(routed.worker_id, set()).add(request_id)
        return [msgspec.structs.replace(
            load,
            num_pending_prefill_tokens=max(load.num_pending_prefill_tokens,
                                           tokens.get(load.worker_id, 0)),
            num_requests_running=max(load.num_requests_running,
                                     len(requests.get(load.worker_id, ()))),
            kv_blocks_in_use=max(load.kv_blocks_in_use, blocks.get(load.worker_id, 0)))
            for load in loads]
