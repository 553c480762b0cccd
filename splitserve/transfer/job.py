"""P side: one request's prefill, its pinned blocks and its lease.

A Job outlives connections: when D's connection breaks, the prefill keeps running and the
blocks stay pinned, so D can reconnect and resume. Only two things end a Job: D's RELEASE
(transfer complete) or the lease running out (D silent or gone) / server shutdown.

NOTE: every field below is guarded by `cond`; connections wait on it for new work.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from splitserve.transfer.backend import (BlocksReady, Done, PrefillBackend, PrefillRequest,
                                         Progress)

log = logging.getLogger(__name__)


class Job:
    def __init__(self, request: PrefillRequest, backend: PrefillBackend, lease: float,
                 num_kv_blocks: int, on_pinned: Callable[[int], None]):
        self.request = request
        self.rid = request.request_id
        self.backend = backend
        self.lease = lease
        self.num_kv_blocks = num_kv_blocks
        self.on_pinned = on_pinned
        self.cond = threading.Condition()
        self.ids: list[int] = []          # physical ids of logical blocks ready so far
        self.tokens_done = 0
        self.progress_seq = 0             # bumps on every Progress: "the engine is alive"
        self.tokens_total = len(request.token_ids)
        self.first_token: int | None = None
        self.first_logprobs = None        # protocol.FirstTokenLogprobs, with first_token
        self.error: str | None = None
        self.released = False
        self.conn = None                  # the connection currently serving D, if any
        self.deadline = time.monotonic() + lease
        self.bytes_sent = 0
        self.verified_upto = 0
        self.started = time.monotonic()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"kv-prefill-{self.rid}", daemon=True).start()

    def renew(self, verified_upto: int | None = None) -> None:
        with self.cond:
            self.deadline = time.monotonic() + self.lease
            if verified_upto is not None:
                self.verified_upto = max(self.verified_upto, verified_upto)

    def _run(self) -> None:
        n = self.request.num_blocks
        events = self.backend.start(self.request)
        try:
            for ev in events:
                with self.cond:
                    if self.released:
                        break
                    if isinstance(ev, BlocksReady):
                        self._check_blocks(ev)
                        self.ids.extend(ev.block_ids)
                        self.on_pinned(len(ev.block_ids))
                    elif isinstance(ev, Progress):
                        self.tokens_done, self.tokens_total = ev.tokens_done, ev.tokens_total
                        self.progress_seq += 1
                    elif isinstance(ev, Done):
                        if len(self.ids) != n:
                            raise RuntimeError(f"Done after {len(self.ids)} of {n} blocks")
                        self.tokens_done = self.tokens_total
                        self.first_token = ev.first_token
                        self.first_logprobs = ev.logprobs
                    self.cond.notify_all()
                if isinstance(ev, Done):
                    break
            else:
                with self.cond:
                    if not self.released:
                        raise RuntimeError("prefill ended without Done")
        except Exception as e:  # the backend's failure is reported to D, not raised here
            log.error("request %s: prefill failed: %s", self.rid, e)
            with self.cond:
                self.error = f"prefill failed on P: {e}"
                self.cond.notify_all()
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _check_blocks(self, ev: BlocksReady) -> None:
        # A backend bug must not make P send the wrong memory or run past the request.
        if ev.first_block != len(self.ids) or not ev.block_ids:
            raise RuntimeError(f"BlocksReady({ev.first_block}, {len(ev.block_ids)} ids) "
                               f"after {len(self.ids)} ready blocks")
        if len(self.ids) + len(ev.block_ids) > self.request.num_blocks:
            raise RuntimeError(f"BlocksReady beyond the request's {self.request.num_blocks} blocks")
        for b in ev.block_ids:
            if not 0 <= b < self.num_kv_blocks:
                raise RuntimeError(f"BlocksReady names physical block {b} outside "
                                   f"0..{self.num_kv_blocks - 1}")
