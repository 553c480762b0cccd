"""Scheduler side of the connector: request bookkeeping, integer block ids only.

P (a request with kv_transfer_params {"do_remote_decode": true, "transfer_id": X}): each
step, tell the workers which of the prompt's blocks this step computes, so they stream
them to D as soon as the forward is done (not after the whole prompt). When the request
finishes, keep its blocks (request_finished -> True) until the workers report that D has
them or the lease ran out.

D ({"do_remote_prefill": true, "transfer_id": X, "remote_host", "remote_port"}): the whole
prompt is external and loads asynchronously; once the blocks are allocated the workers
pull them. vLLM then recomputes the prompt's last token to sample the first output token,
exactly as for its own P/D connectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splitserve.vllm_connector.metadata import RecvSpec, SendStep, SplitserveMetadata

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class TransferParamsError(ValueError):
    """kv_transfer_params that name a transfer but cannot be acted on."""


@dataclass
class _Sending:
    transfer_id: str
    num_prompt_tokens: int
    announced: bool = False      # the prompt went to the workers already


def transfer_id_of(params: dict[str, Any], req_id: str) -> str:
    tid = params.get("transfer_id")
    if not isinstance(tid, str) or not tid or len(tid) > 256 or not tid.isascii() \
            or any(c.isspace() for c in tid):
        raise TransferParamsError(f"request_id={req_id} kv_transfer_params need a "
                                  f"transfer_id (printable ASCII, no spaces), got {tid!r}")
    return tid


class SchedulerSide:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self._sending: dict[str, _Sending] = {}        # P: req_id -> state while prefilling
        self._finished: dict[str, str] = {}            # P: finished, blocks held; next meta
        self._aborted: dict[str, str] = {}             # P: transfer_id -> reason; next meta
        self._recv_new: dict[str, RecvSpec] = {}       # D: loads to start; next meta
        self._loading: set[str] = set()                # D: loads started, not yet reported done
        self._cancels: dict[str, str] = {}             # D: loads to stop; next meta

    # -- D ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return 0, False
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params:
            return
        rid = request.request_id
        if params.get("do_remote_decode") and rid not in self._sending:
            self._sending[rid] = _Sending(transfer_id_of(params, rid), request.num_prompt_tokens)
        if not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False     # one transfer per request, even if re-scheduled
        if num_external_tokens <= 0:
            return
        tid = transfer_id_of(params, rid)
        host, port = params.get("remote_host"), params.get("remote_port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise TransferParamsError(f"request_id={rid} kv_transfer_params need remote_host "
                                      f"(str) and remote_port (int), got {host!r}, {port!r}")
        n = -(-request.num_prompt_tokens // self.block_size)
        (ids,) = blocks.get_block_ids()
        local = request.num_prompt_tokens - num_external_tokens   # block-aligned local hit
        self._recv_new[rid] = RecvSpec(rid, tid, host, port, list(request.prompt_token_ids),
                                       list(ids[:n]), local // self.block_size)
        log.info("request_id=%s transfer %s: loading %d prompt tokens (%d blocks, %d local) "
                 "from %s:%d", rid, tid, num_external_tokens, n, local // self.block_size,
                 host, port)

    def update_connector_output(self, output: "KVConnectorOutput") -> None:
        for rid in output.finished_recving or ():
            self._loading.discard(rid)

    # -- both ------------------------------------------------------------------------

    def build_connector_meta(self, so: "SchedulerOutput") -> SplitserveMetadata:
        meta = SplitserveMetadata()
        for rid in so.preempted_req_ids or ():
            s = self._sending.pop(rid, None)
            if s is not None:   # its blocks are freed: what was promised to D is gone
                self._aborted[s.transfer_id] = "the request was preempted on the prefill worker"
        for nr in so.scheduled_new_reqs:
            if nr.req_id in self._sending:
                self._send_step(meta, nr.req_id, nr.num_computed_tokens, nr.block_ids[0],
                                so.num_scheduled_tokens[nr.req_id], nr.prompt_token_ids)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid in self._sending:
                new = cached.new_block_ids[i]
                self._send_step(meta, rid, cached.num_computed_tokens[i],
                                new[0] if new else [], so.num_scheduled_tokens[rid], None)
        meta.finished, self._finished = self._finished, {}
        meta.aborted, self._aborted = self._aborted, {}
        meta.recvs = list(self._recv_new.values())
        self._loading.update(self._recv_new)
        self._recv_new.clear()
        meta.cancels, self._cancels = self._cancels, {}
        return meta

    def _send_step(self, meta: SplitserveMetadata, rid: str, computed: int,
                   new_blocks: list[int], scheduled: int, prompt: list[int] | None) -> None:
        s = self._sending[rid]
        done = min(s.num_prompt_tokens, computed + scheduled)
        if computed >= s.num_prompt_tokens and not new_blocks:
            return    # decoding past the prompt: nothing more to send
        meta.sends.append(SendStep(rid, s.transfer_id, done, s.num_prompt_tokens,
                                   list(new_blocks),
                                   None if s.announced else list(prompt or [])))
        s.announced = True

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        if rid in self._recv_new:            # aborted before its load started
            self._recv_new.pop(rid)
            return False, None
        if rid in self._loading:             # a worker is writing into its blocks
            self._cancels[rid] = f"request finished ({request.status.name}) while loading"
            return True, None
        s = self._sending.pop(rid, None)
        if s is None:
            return False, None
        if (request.status in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
                and request.num_computed_tokens >= s.num_prompt_tokens and _any_blocks(block_ids)):
            self._finished[rid] = s.transfer_id
            return True, {"transfer_id": s.transfer_id}
        self._aborted[s.transfer_id] = f"the prefill request ended as {request.status.name}"
        log.warning("request_id=%s transfer %s: prefill ended as %s before its KV was "
                    "complete; decode will recompute", rid, s.transfer_id, request.status.name)
        return False, None


def _any_blocks(block_ids) -> bool:
    """vLLM passes one list, or one list per KV cache group."""
    return any(_any_blocks(g) if isinstance(g, (list, tuple)) else True for g in block_ids)
