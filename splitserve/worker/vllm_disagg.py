"""Disaggregated serving with vLLM workers: KV moves through SplitserveConnector inside vLLM.

The frontend routes as for our own engine: a decode worker gets a GenerateRequest naming a
prefill worker (PrefillTarget). For one request, with one fresh transfer id X:
- the decode worker POSTs the prompt to the prefill worker's /prefill (its worker API,
  found in discovery with the KV address), and at the same time adds the request to its
  own vLLM with kv_transfer_params {do_remote_prefill, transfer_id X, remote_host/port:
  the prefill worker's KV server}; its connector pulls the blocks while P computes them;
- the prefill worker adds the prompt to its vLLM with {do_remote_decode, transfer_id X},
  max_tokens 1, greedy: its one token is thrown away. D's vLLM recomputes the prompt's
  last token and samples every output token itself, with the request's own sampling and
  seed, so greedy and seeded output equal aggregated vLLM's;
- the decode worker answers once its first token exists, i.e. once the KV is in place or
  vLLM fell back: under --kv-fallback fail a failed transfer is then the same 502
  'kv_transfer' our engine's decode worker gives (TransferFailed), before any output.

A transfer that fails is vLLM's kv_load_failure_policy's (vllm_kv_transfer.py): recompute
the blocks that did not arrive (a counted fallback: splitserve_kv_transfer_fallbacks_total
by reason) or fail. A prefill worker that refuses the POST is a fallback `refused` at
once (vllm_remote_prefill.py): the decode side does not wait for the transfer to time out.

This module: the prefill side (POST /prefill, the KV port) and the seam both sides use;
the decode side is vllm_remote_prefill.py.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response

from splitserve.disconnect import unless_disconnected
from splitserve.engine.types import RequestOutput, SamplingParams
from splitserve.worker import protocol as p
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_api import (CapacityError, EngineDeadError, EngineState,
                                          RequestError, RequestFailed, WorkerEngine)
from splitserve.worker.vllm_kv_transfer import ConnectorReports, ConnectorSettings

logger = logging.getLogger(__name__)

# The prefill side's own request: one greedy token, which nobody reads.
_PREFILL_ONLY = SamplingParams(max_tokens=1, temperature=0.0)


class ConnectorEngine(ABC):
    """An engine that moves KV itself, through a KV connector (VllmEngine)."""

    connector: ConnectorSettings | None
    reports: ConnectorReports | None

    @abstractmethod
    def kv_ranks(self) -> list[dict[str, Any]]:
        """Each TP rank's KV as its connector describes it (read_rank_states), once every
        rank registered its KV; [] before."""

    @abstractmethod
    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  kv_transfer_params: dict[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        """WorkerEngine.add, with the connector's per-request instructions."""


class PrefillOrder(msgspec.Struct, forbid_unknown_fields=True):
    """POST /prefill on a vLLM prefill worker: compute the prompt, hold its KV for the
    decode worker that asks for transfer_id on the KV port."""

    request_id: str
    transfer_id: str
    prompt_token_ids: list[int]


class ConnectorKVPort:
    """A vLLM prefill worker's KV port (kv_port.KVPort's interface): the connector's KV
    server, which vLLM's worker process (rank r: kv_port + r) opens while the engine
    loads; so it listens once the engine is ready."""

    def __init__(self, engine: WorkerEngine, config: WorkerConfig, port: int):
        self.engine = engine
        self.config = config
        self.port = port
        self.address: tuple[str, int] | None = None
        self._task: asyncio.Task | None = None

    def start_when_ready(self) -> None:
        self._task = asyncio.create_task(self._start(), name="kv-port")

    def status(self) -> str:
        return "the KV port opens once vLLM has loaded"

    async def _start(self) -> None:
        while self.engine.state is EngineState.LOADING:
            await asyncio.sleep(0.05)
        if self.engine.state is EngineState.READY:
            self.address = (self.config.advertised_host(), self.port)
            logger.info("KV port (vLLM's SplitserveConnector) on %s:%d, advertised as %s:%d",
                        self.config.host, self.port, *self.address)

    def close(self) -> None:
        """The KV server is vLLM's: it closes with the engine."""
        if self._task is not None:
            self._task.cancel()


def add_prefill_route(app: FastAPI, engine: ConnectorEngine | WorkerEngine) -> None:
    """POST /prefill (PrefillOrder) on a vLLM prefill worker; answers once the prefill
    finished (its KV is then held for the decode worker, up to the lease). A caller that
    leaves aborts it."""

    @app.post("/prefill")
    async def prefill(request: Request) -> Response:
        if engine.state is not EngineState.READY:
            return _reply(503, p.WorkerHealth(engine.state.value, engine.failure))
        try:
            order = msgspec.json.decode(await request.body(), type=PrefillOrder)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return _reply(400, p.WorkerError(f"invalid prefill order: {e}"))
        # The transfer id names this prefill here: unique even when a request is retried.
        rid, params = order.transfer_id, {"do_remote_decode": True,
                                          "transfer_id": order.transfer_id}
        try:
            outputs = await engine.add(rid, order.prompt_token_ids, _PREFILL_ONLY, params)
            logger.info("request_id=%s prefill of %d tokens for transfer %s admitted", rid,
                        len(order.prompt_token_ids), order.transfer_id)
            answered, _ = await unless_disconnected(request, _drain(outputs))
        except RequestError as e:
            logger.info("request_id=%s prefill refused: %s", rid, e)
            return _reply(400, p.WorkerError(str(e), e.param))
        except CapacityError as e:
            return _reply(503, p.WorkerError(str(e), code="capacity"))
        except (EngineDeadError, RequestFailed) as e:
            logger.error("request_id=%s prefill failed: %s", rid, e)
            return _reply(503, p.WorkerHealth("failed", str(e)))
        if not answered:
            logger.info("request_id=%s the decode worker left; prefill aborted", rid)
            return Response(status_code=499)
        return _reply(200, p.WorkerHealth("ok"))


async def _drain(outputs: AsyncIterator[RequestOutput]) -> None:
    async for _ in outputs:
        pass


def _reply(status: int, msg: msgspec.Struct) -> Response:
    return Response(p.encode(msg), status_code=status, media_type="application/json")
