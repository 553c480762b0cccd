"""P's worker side: vLLM's prefill, seen by splitserve's KV server as a `PrefillBackend`.

vLLM computes the prompt because the proxy sent it the request; D connects to the KV
server independently (often before P has even scheduled it) and names the transfer id.
`start` waits for the transfer to be registered by the scheduler's metadata, then yields
BlocksReady as each step's forward completes whole blocks (the last, partial block when
the prompt is done), with PROGRESS while waiting, so D can tell a busy P from a dead one.

A finished prefill request's blocks stay allocated in vLLM (request_finished -> delay
free) until D's RELEASE, the server's lease on a connected D, or, if D never connects, a
lease counted from the end of the prefill; `finished_sending` then hands them back.

Threads: the model runner calls on_step / on_finished / on_aborted / finished_sending;
the KV server's threads call start / release. Everything below is guarded by `_cond`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

from splitserve.transfer.backend import (BlocksReady, Done, Event, PrefillBackend,
                                         PrefillRequest, Progress)
from splitserve.transfer.config import TransferStats
from splitserve.vllm_connector.metadata import SendStep

log = logging.getLogger(__name__)

_ENDED_KEEP = 4096     # recently ended transfers remembered, so a late D hears why at once


@dataclass
class _Transfer:
    tid: str
    req_id: str
    num_prompt_tokens: int
    block_size: int
    prompt: list[int] | None = None
    block_ids: list[int] = field(default_factory=list)
    tokens_done: int = 0
    finished_at: float | None = None   # request finished in vLLM; its blocks are held for D
    aborted: str | None = None
    claimed: bool = False              # a D session started it (the server's lease applies)
    released: bool = False             # the server let go: D has it, or lease/cancel

    @property
    def num_blocks(self) -> int:
        return -(-self.num_prompt_tokens // self.block_size)

    def ready_blocks(self) -> int:
        if self.tokens_done >= self.num_prompt_tokens:
            return min(len(self.block_ids), self.num_blocks)
        return min(len(self.block_ids), self.tokens_done // self.block_size)


class Producer(PrefillBackend):
    def __init__(self, block_size: int, lease: float, heartbeat: float, stats: TransferStats,
                 stage: Callable[[list[int]], None] | None = None):
        """stage: copies blocks to where the KV server reads them (KV on a GPU: the host
        mirror, staging.py) and returns once they are there; None when it reads vLLM's
        own KV."""
        self.block_size = block_size
        self._stage = stage
        self.lease = lease
        self.heartbeat = heartbeat
        self.stats = stats
        self._cond = threading.Condition()
        self._by_tid: dict[str, _Transfer] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()   # tid -> why
        self._finished_ids: set[str] = set()                  # vLLM said finished (req ids)

    # -- model runner thread -----------------------------------------------------------

    def on_step(self, step: SendStep) -> None:
        """After this step's forward: its tokens are in KV (CPU: the forward is synchronous)."""
        with self._cond:
            t = self._by_tid.get(step.transfer_id)
            if t is None:
                t = _Transfer(step.transfer_id, step.req_id, step.num_prompt_tokens,
                              self.block_size, step.prompt)
                self._by_tid[t.tid] = t
                self._ended.pop(t.tid, None)
            t.block_ids.extend(step.new_block_ids)
            # The blocks holding this step's tokens (a prefix-cache hit's come with the
            # first step): staged before tokens_done says they are ready.
            fresh = t.block_ids[t.tokens_done // self.block_size:
                                -(-step.tokens_done // self.block_size)]
        if self._stage is not None:
            self._stage(fresh)
        with self._cond:
            t.tokens_done = max(t.tokens_done, step.tokens_done)
            self._cond.notify_all()

    def on_finished(self, req_id: str, tid: str) -> None:
        with self._cond:
            t = self._by_tid.get(tid)
            if t is not None:
                t.finished_at = time.monotonic()
                t.tokens_done = t.num_prompt_tokens
                self._cond.notify_all()

    def on_aborted(self, tid: str, why: str) -> None:
        with self._cond:
            t = self._by_tid.pop(tid, None)
            self._end(tid, why)
            if t is not None:
                t.aborted = why
            self._cond.notify_all()

    def finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        """Requests whose held blocks vLLM may free now. Only ids vLLM has reported
        finished qualify (its contract); a D that never connected is waited for one lease."""
        now = time.monotonic()
        out: set[str] = set()
        with self._cond:
            self._finished_ids |= finished_req_ids
            for tid, t in list(self._by_tid.items()):
                if t.finished_at is None or t.req_id not in self._finished_ids:
                    continue
                if not t.released and not t.claimed and now - t.finished_at > self.lease:
                    t.released = True
                    self._end(tid, "lease expired before any decode worker asked for it")
                    self.stats.add("lease_expired")
                    self.stats.incident("lease_expired", t.req_id, "decode never connected",
                                        f"transfer {tid}: {t.num_blocks} blocks held "
                                        f"{now - t.finished_at:.1f}s (lease {self.lease:.1f}s)")
                    log.warning("request_id=%s transfer %s: releasing %d KV blocks: lease "
                                "expired, no decode worker asked for them within %.1fs",
                                t.req_id, tid, t.num_blocks, self.lease)
                if t.released:
                    del self._by_tid[tid]
                    self._finished_ids.discard(t.req_id)
                    out.add(t.req_id)
        return out

    def _end(self, tid: str, why: str) -> None:
        self._ended[tid] = why
        while len(self._ended) > _ENDED_KEEP:
            self._ended.popitem(last=False)

    # -- KV server threads --------------------------------------------------------------

    def start(self, request: PrefillRequest) -> Iterator[Event]:
        tid = request.request_id
        t = yield from self._wait_registered(request)
        with self._cond:
            if t.prompt is not None and t.prompt != list(request.token_ids):
                raise RuntimeError(f"transfer {tid}: decode's prompt ({len(request.token_ids)} "
                                   f"tokens) differs from prefill request_id={t.req_id}'s "
                                   f"({len(t.prompt)} tokens)")
            if request.num_blocks != t.num_blocks:
                raise RuntimeError(f"transfer {tid}: decode expects {request.num_blocks} blocks, "
                                   f"prefill request_id={t.req_id} has {t.num_blocks}")
            t.claimed = True
        log.info("request_id=%s transfer %s: decode connected, streaming %d blocks as they "
                 "are computed", t.req_id, tid, t.num_blocks)
        sent = early = 0    # early: blocks handed over while the prompt was still computing
        while True:
            with self._cond:
                while True:
                    if t.released:
                        return
                    if t.aborted is not None:
                        raise RuntimeError(f"transfer {tid}: {t.aborted}")
                    ready = t.ready_blocks()
                    if ready > sent:
                        break
                    if self._cond.wait(self.heartbeat / 2) is False:
                        break           # quiet for a while: say we are alive
                ready, ids, done = t.ready_blocks(), list(t.block_ids), t.tokens_done
            if ready > sent:
                if done < t.num_prompt_tokens:
                    early += ready - sent
                yield BlocksReady(sent, ids[sent:ready])
                sent = ready
            yield Progress(min(done, t.num_prompt_tokens), t.num_prompt_tokens)
            if sent == t.num_blocks:
                log.info("request_id=%s transfer %s: all %d blocks handed to the sender, %d of "
                         "them while the prompt was still computing", t.req_id, tid,
                         t.num_blocks, early)
                # D's vLLM recomputes the prompt's last token and samples the first output
                # token itself; DONE only says the KV is complete.
                yield Done(0)
                return

    def _wait_registered(self, request: PrefillRequest):
        """D may ask before P's vLLM has scheduled the request: wait (saying PROGRESS 0)
        up to one lease for the scheduler to announce it."""
        tid = request.request_id
        deadline = time.monotonic() + self.lease
        while True:
            with self._cond:
                t = self._by_tid.get(tid)
                if t is None and tid in self._ended:
                    raise RuntimeError(f"transfer {tid} is over on the prefill worker: "
                                       f"{self._ended[tid]}")
                if t is None and time.monotonic() > deadline:
                    raise RuntimeError(f"transfer {tid}: no such prefill request arrived within "
                                       f"{self.lease:.0f}s (was it sent to this prefill worker "
                                       f"with do_remote_decode and the same transfer_id?)")
                if t is None:
                    self._cond.wait(self.heartbeat / 2)
            if t is not None:
                return t
            yield Progress(0, len(request.token_ids))

    def release(self, request_id: str) -> None:
        with self._cond:
            t = self._by_tid.get(request_id)
            if t is not None:
                # D has every block, gave up, or its lease ran out. If vLLM has not finished
                # the request yet, finished_sending hands its blocks back once it has.
                t.released = True
            self._cond.notify_all()
