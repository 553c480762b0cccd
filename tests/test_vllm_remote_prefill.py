"""A vLLM decode worker whose prefill worker refuses the prefill (POST /prefill answered
with an error) does not wait for the KV transfer to time out: the request in its vLLM is
aborted at once and, under --kv-fallback local, computed here; under fail it is the 502
any failed transfer gives. Either way a fallback `refused`, counted and in /incidents. A
prefill worker that answers 200, or not at all, leaves the transfer to the connector.
(Without vLLM: a stand-in engine; the same refusal through vLLM is in
test_vllm_disagg_faults.py.)"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator

import httpx
import pytest

from splitserve.engine.types import FinishReason, RequestOutput, SamplingParams
from splitserve.transfer.config import TransferStats
from splitserve.worker.config import WorkerConfig
from splitserve.worker.incidents import IncidentLog
from splitserve.worker.protocol import PrefillTarget
from splitserve.worker.vllm_kv_transfer import ConnectorReports
from splitserve.worker.vllm_remote_prefill import ConnectorRemotePrefill, ConnectorTransferFailed

TARGET = PrefillTarget("p-1", "127.0.0.1", 7600)


class StandIn:
    """add() with a transfer waits for KV that never comes until its stream is closed
    (vLLM aborts it); without one it answers at once, as a local prefill does."""

    def __init__(self):
        self.connector = None
        self.stats = TransferStats()
        self.incidents = IncidentLog()
        self.stats.on_incident = self.incidents.record
        self.reports = ConnectorReports(self.stats, lambda _s: None)
        self.added: list[tuple[str, bool]] = []
        self.closed: list[str] = []
        self.kv_arrives = asyncio.Event()

    async def add(self, request_id, prompt, params, kv_transfer_params=None
                  ) -> AsyncIterator[RequestOutput]:
        self.added.append((request_id, kv_transfer_params is not None))
        return self._outputs(request_id, kv_transfer_params is not None)

    async def _outputs(self, request_id: str, remote: bool):
        try:
            if remote:
                await self.kv_arrives.wait()
            yield RequestOutput(request_id, [7, 8], finished=True,
                                finish_reason=FinishReason.LENGTH)
        finally:
            self.closed.append(request_id)


def _remote(engine: StandIn, fallback: str, answer: httpx.Response | None) -> ConnectorRemotePrefill:
    async def record(_rid, _target):
        return types.SimpleNamespace(api_url="http://p-1", kv_host="127.0.0.1", kv_port=7600)

    async def handler(_request: httpx.Request) -> httpx.Response:
        if answer is None:
            raise httpx.ConnectError("refused")
        if answer.status_code == 200:
            engine.kv_arrives.set()          # P computed it: the KV is there
        return answer

    remote = ConnectorRemotePrefill(engine, WorkerConfig(role="decode", kv_fallback=fallback),
                                    types.SimpleNamespace(record=record))
    remote._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return remote


async def _run(remote: ConnectorRemotePrefill) -> list[RequestOutput]:
    stream = await remote.run("r-1", [1, 2, 3], SamplingParams(max_tokens=2), TARGET)
    return [out async for out in stream]


def test_a_refused_prefill_is_computed_here_at_once_and_counted():
    engine = StandIn()
    refusal = httpx.Response(400, json={"error": "prompt too long"})
    outs = asyncio.run(asyncio.wait_for(_run(_remote(engine, "local", refusal)), 10))
    assert [o.new_token_ids for o in outs] == [[7, 8]] and outs[-1].num_transferred_tokens == 0
    # The waiting request was closed (vLLM aborts it) before the same id was added again.
    assert engine.added == [("r-1", True), ("r-1", False)] and engine.closed == ["r-1", "r-1"]
    assert engine.stats.fallbacks == {"refused": 1}
    (incident,) = engine.incidents.snapshot()["recent"]
    assert (incident["kind"], incident["reason"], incident["peer"]) == ("fallback", "refused",
                                                                        "p-1")
    assert "answered 400" in incident["detail"] and incident["detail"].endswith("policy local")


def test_a_refused_prefill_under_fail_is_the_transfer_failure_502():
    engine = StandIn()
    refusal = httpx.Response(503, json={"error": "not ready"})
    with pytest.raises(ConnectorTransferFailed, match="refused the prefill: it answered 503"):
        asyncio.run(asyncio.wait_for(_run(_remote(engine, "fail", refusal)), 10))
    assert engine.added == [("r-1", True)] and engine.closed == ["r-1"]
    assert engine.stats.fallbacks == {"refused": 1}


@pytest.mark.parametrize("answer", [httpx.Response(200, json={"state": "ok"}), None],
                         ids=["prefilled", "unreachable"])
def test_a_prefill_answered_or_unanswered_leaves_the_transfer_to_the_connector(answer):
    engine = StandIn()

    async def go():
        if answer is None:           # the connector's load ends it: here, the KV arrives
            asyncio.get_running_loop().call_later(0.2, engine.kv_arrives.set)
        return await _run(_remote(engine, "local", answer))

    outs = asyncio.run(asyncio.wait_for(go(), 10))
    assert [o.new_token_ids for o in outs] == [[7, 8]]
    assert engine.added == [("r-1", True)] and not engine.stats.fallbacks
