"""D's worker side: one thread per request pulls its KV from P's KV server into the
blocks vLLM allocated, with everything `fetch_kv` does (verified frames, targeted
re-send, resume after a reset, PROGRESS liveness, stall/busy timeouts).

vLLM asks each step which loads finished (`poll`). A load that did not end OK reports the
request's blocks past the verified prefix as load errors, in the same step, so vLLM
applies its kv_load_failure_policy: `recompute` keeps the verified prefix and computes
only the rest (counted as a fallback by reason, like our own engine), `fail` ends the
request with an error. Either way the log line names the request and the reason.

Each ended load also leaves a report (`drain_reports`: the transfer id, its outcome, the
prompt tokens whose KV arrived, its duration) and its incidents (resumes, checksum
re-sends, a fallback: TransferStats.fetch_incidents, named by transfer id), which the
connector hands to vLLM's stats on their way to the API process (stats.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from splitserve.transfer.backend import PrefillRequest
from splitserve.transfer.client import FetchCancel, fetch_kv
from splitserve.transfer.config import FetchResult, Outcome, TransferConfig, TransferStats
from splitserve.transfer.kvmem import KVBlocks
from splitserve.vllm_connector.metadata import RecvSpec

log = logging.getLogger(__name__)


class Consumer:
    def __init__(self, blocks: KVBlocks, config: TransferConfig, fingerprint: dict[str, str],
                 stats: TransferStats, tp_rank: int, failure_policy: str,
                 on_loaded: Callable[[list[int]], None] | None = None):
        """on_loaded: copies blocks that arrived to where vLLM reads them (KV on a GPU:
        from the host mirror, staging.py), returning once they are there."""
        self.blocks = blocks
        self._on_loaded = on_loaded
        self.config = config
        self.fingerprint = fingerprint
        self.stats = stats
        self.tp_rank = tp_rank
        self.failure_policy = failure_policy
        self._lock = threading.Lock()
        self._cancels: dict[str, FetchCancel] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._done: dict[str, tuple[RecvSpec, FetchResult]] = {}
        self._reports: list[dict] = []      # poll's thread only (vLLM's model runner)

    def start(self, spec: RecvSpec) -> None:
        cancel = FetchCancel()
        t = threading.Thread(target=self._run, args=(spec, cancel), daemon=True,
                             name=f"kv-pull-{spec.req_id}")
        with self._lock:
            self._cancels[spec.req_id] = cancel
            self._threads[spec.req_id] = t
        t.start()

    def cancel(self, req_id: str, why: str) -> None:
        with self._lock:
            c = self._cancels.get(req_id)
        if c is not None:
            c.cancel(why)

    def _run(self, spec: RecvSpec, cancel: FetchCancel) -> None:
        # P's tensor-parallel rank r serves D's rank r.
        addr = (spec.host, spec.port + self.tp_rank)
        req = PrefillRequest(spec.transfer_id, spec.prompt, num_blocks=len(spec.block_ids))
        try:
            result = fetch_kv(addr, req, spec.block_ids, self.blocks, self.config,
                              self.fingerprint, self.stats, cancel, spec.have_blocks)
        except Exception as e:   # a bug or a bad spec must still end the load
            log.exception("request_id=%s transfer %s: KV load crashed", spec.req_id,
                          spec.transfer_id)
            result = FetchResult(Outcome.PROTOCOL_ERROR, f"load crashed: {e!r}",
                                 spec.have_blocks, None, 0, 0, 0, 0.0, "")
            self.stats.record_fetch(result)
        with self._lock:
            self._done[spec.req_id] = (spec, result)

    def poll(self) -> tuple[set[str], set[int]]:
        """(requests whose load ended, block ids that did not arrive verified)."""
        with self._lock:
            done, self._done = self._done, {}
            for rid in done:
                self._cancels.pop(rid, None)
                self._threads.pop(rid, None)
        invalid: set[int] = set()
        for rid, (spec, r) in done.items():
            self._report(spec, r)
            if self._on_loaded is not None and r.outcome is not Outcome.CANCELLED:
                self._on_loaded(spec.block_ids[spec.have_blocks:_arrived(spec, r)])
            if r.ok:
                log.info("request_id=%s transfer %s: KV loaded, %d blocks, %d bytes in %.3fs "
                         "over %s (%d resumes, %d checksum failures)", rid, spec.transfer_id,
                         len(spec.block_ids) - spec.have_blocks, r.bytes, r.seconds,
                         r.transport, r.resumes, r.checksum_failures)
                continue
            if r.outcome is Outcome.CANCELLED:   # the request is gone; nothing to recompute
                continue
            missing = spec.block_ids[max(r.blocks_verified, spec.have_blocks):]
            invalid.update(missing)
            action = (f"recomputing the {len(missing)} blocks that did not arrive, reusing "
                      f"{r.blocks_verified} verified" if self.failure_policy == "recompute"
                      else "failing the request (kv_load_failure_policy=fail)")
            log.warning("request_id=%s transfer %s: KV load failed (%s): %s; %s", rid,
                        spec.transfer_id, r.outcome.value, r.reason, action)
        return set(done), invalid

    def _report(self, spec: RecvSpec, r: FetchResult) -> None:
        bs = self.blocks.block_size
        tokens = max(0, min(_arrived(spec, r) * bs, len(spec.prompt)) - spec.have_blocks * bs)
        self._reports.append({"transfer_id": spec.transfer_id, "outcome": r.outcome.value,
                              "tokens": tokens, "seconds": r.seconds})
        self.stats.fetch_incidents(spec.transfer_id, f"{spec.host}:{spec.port + self.tp_rank}",
                                   r, self.failure_policy)

    def drain_reports(self) -> list[dict]:
        """The reports of the loads poll saw end since the last call."""
        out, self._reports = self._reports, []
        return out

    def close(self) -> None:
        with self._lock:
            cancels = list(self._cancels.values())
            threads = list(self._threads.values())
        for c in cancels:
            c.cancel("vLLM worker shutting down")
        for t in threads:
            t.join(timeout=5)


def _arrived(spec: RecvSpec, r: FetchResult) -> int:
    """Logical blocks [0, n) now in D's KV: local hits, then what arrived verified."""
    return len(spec.block_ids) if r.ok else max(r.blocks_verified, spec.have_blocks)
