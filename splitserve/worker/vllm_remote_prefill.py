"""The decode side of disaggregated serving with vLLM workers (vllm_disagg.py has the
flow): POST the prompt to the prefill worker's /prefill and, at the same time, add the
request to this worker's vLLM with kv_transfer_params naming the transfer; answer from
the first output on (the KV is in place, or vLLM fell back).

A prefill worker that refuses the POST (it answered, with an error: 400 for a prompt it
will not take, 503 while it cannot) will never compute the prompt: its KV server would
only say so when its lease runs out. The refusal ends the wait at once instead: this
request in vLLM is aborted (the connector cancels its load) and, under --kv-fallback
local, added again without the transfer, computed here; a fallback `refused`, counted and
in /incidents. Under --kv-fallback fail it is the 502 any failed transfer gives. A POST
that gets no answer (the prefill worker is unreachable or died) is left to the
connector: its load notices the dead KV server and keeps the blocks that did arrive.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec

from splitserve.engine.types import RequestOutput, SamplingParams
from splitserve.transfer.config import Outcome
from splitserve.worker import protocol as p
from splitserve.worker.auth import bearer
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_api import RequestFailed
from splitserve.worker.prefill_peers import PrefillPeers
from splitserve.worker.remote_prefill import TransferFailed
from splitserve.worker.vllm_disagg import ConnectorEngine, PrefillOrder

logger = logging.getLogger(__name__)


class ConnectorTransferFailed(TransferFailed):
    """The decode side's vLLM ended the request with an error before its first token,
    under --kv-fallback fail (kv_load_failure_policy fail): its KV transfer failed."""

    def __init__(self, request_id: str, prefill_worker: str, reason: str):
        RuntimeError.__init__(
            self, f"KV transfer for request {request_id} from prefill worker {prefill_worker} "
                  f"failed ({reason}); fallback policy is 'fail' (the decode worker's log "
                  f"names the transfer's outcome)")
        self.result = None


class ConnectorRemotePrefill:
    """The decode side (remote_prefill.RemotePrefill's run and close) for a vLLM decode
    worker. Its transfers are counted by the connector, in vLLM's processes."""

    def __init__(self, engine: ConnectorEngine, config: WorkerConfig, peers: PrefillPeers):
        self.engine = engine
        self.config = config
        self.peers = peers
        # No read timeout: P answers when its prefill is done, which may take a queue's
        # wait; D's own transfer has the stall/busy timeouts, and D's end cancels this.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(
            None, connect=config.transfer.connect_timeout))
        self._tasks: set[asyncio.Task] = set()

    def close(self) -> None:
        """At shutdown: prefills still posted are cancelled (their connections close with
        the process)."""
        for task in list(self._tasks):
            task.cancel()

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams,
                  target: p.PrefillTarget) -> AsyncIterator[RequestOutput]:
        record = await self.peers.record(request_id, target)
        tid = f"{request_id}.{uuid.uuid4().hex[:8]}"
        order = PrefillOrder(request_id, tid, list(prompt))
        post = asyncio.create_task(self._post(record.api_url, order, target.worker_id))
        self._tasks.add(post)
        post.add_done_callback(self._tasks.discard)
        kv_params = {"do_remote_prefill": True, "transfer_id": tid,
                     "remote_host": record.kv_host, "remote_port": record.kv_port}
        logger.info("request_id=%s transfer %s: prefill on %s, KV from %s:%d", request_id, tid,
                    target.worker_id, record.kv_host, record.kv_port)
        try:
            outputs = await self.engine.add(request_id, prompt, params, kv_params)
        except BaseException:
            post.cancel()
            raise
        # The first output exists once the KV is in place or vLLM fell back; P's refusal
        # may come first.
        first_output = asyncio.ensure_future(anext(outputs))
        try:
            await asyncio.wait({first_output, post}, return_when=asyncio.FIRST_COMPLETED)
            refusal = _refusal(post) if not first_output.done() else None
            if refusal is not None:
                first_output.cancel()       # closes the stream: vLLM aborts the request
                await asyncio.wait({first_output})
                if first_output.cancelled():    # else the first output came after all
                    return await self._refused(request_id, prompt, params, target, tid,
                                               refusal)
            first: RequestOutput | RequestFailed = await first_output
        except RequestFailed as e:
            if self.config.kv_fallback == "fail":
                post.cancel()
                logger.warning("request_id=%s transfer %s failed; fallback policy 'fail': "
                               "request refused", request_id, tid)
                raise ConnectorTransferFailed(request_id, target.worker_id, str(e)) from e
            first = e           # not the transfer's doing (vLLM recomputes those): say so
        except BaseException:        # the caller left (cancelled), or the engine died
            first_output.cancel()
            post.cancel()
            raise
        return _stream(first, outputs, post, lambda: self._transferred(tid))

    async def _refused(self, request_id: str, prompt: list[int], params: SamplingParams,
                       target: p.PrefillTarget, tid: str,
                       refusal: str) -> AsyncIterator[RequestOutput]:
        policy = self.config.kv_fallback
        if self.engine.reports is not None:
            self.engine.reports.fallback(
                Outcome.REFUSED.value, request_id,
                f"prefill worker refused transfer {tid}: {refusal}; policy {policy}",
                target.worker_id)
        logger.warning("request_id=%s transfer %s: prefill worker %s refused the prefill (%s); "
                       "%s", request_id, tid, target.worker_id, refusal,
                       "fallback policy 'fail': request refused" if policy == "fail"
                       else "computing the prompt here")
        if policy == "fail":
            raise ConnectorTransferFailed(request_id, target.worker_id,
                                          f"the prefill worker refused the prefill: {refusal}")
        outputs = await self.engine.add(request_id, prompt, params)
        first = await anext(outputs)
        return _stream(first, outputs, None, lambda: 0)

    def _transferred(self, tid: str) -> int:
        reports = self.engine.reports
        return reports.transferred_tokens(tid) if reports is not None else 0

    async def _post(self, api_url: str, order: PrefillOrder, worker_id: str) -> str | None:
        """POST /prefill; returns the prefill worker's refusal, None once it answered 200
        (the prefill is done) or when it did not answer (the connector sees to that)."""
        try:
            resp = await self._http.post(f"{api_url}/prefill", content=msgspec.json.encode(order),
                                         headers={"content-type": "application/json",
                                                  **bearer(self.config.transfer.secret)})
        except httpx.HTTPError as e:
            logger.warning("request_id=%s transfer %s: prefill worker %s unreachable (%r); the "
                           "KV transfer falls back unless it arrives", order.request_id,
                           order.transfer_id, worker_id, e)
            return None
        if resp.status_code == 200:
            return None
        logger.info("request_id=%s transfer %s: prefill worker %s answered %d", order.request_id,
                    order.transfer_id, worker_id, resp.status_code)
        return f"it answered {resp.status_code}: {resp.text[:300]}"


def _refusal(post: asyncio.Task) -> str | None:
    if not post.done() or post.cancelled() or post.exception() is not None:
        return None
    return post.result()


def _counted(out: RequestOutput, transferred: Callable[[], int]) -> RequestOutput:
    if out.finished:
        out.num_transferred_tokens = transferred()
    return out


async def _stream(first: RequestOutput | RequestFailed, outputs: AsyncIterator[RequestOutput],
                  post: asyncio.Task | None,
                  transferred: Callable[[], int]) -> AsyncIterator[RequestOutput]:
    """The decode side's outputs; the final one says how many prompt tokens' KV arrived
    (the connector reported it before the request's first output, see ConnectorReports)."""
    try:
        if isinstance(first, RequestFailed):
            raise first
        yield _counted(first, transferred)
        async for out in outputs:
            yield _counted(out, transferred)
    finally:
        # D's request is over: P's part is done (D had its KV) or useless (D fell back);
        # a prefill still running on P is aborted by the closed connection.
        if post is not None:
            post.cancel()
        await outputs.aclose()
