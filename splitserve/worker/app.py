"""The worker's internal HTTP API (frontend -> worker), over one AsyncEngine.

POST /generate streams NDJSON GenerateChunk lines; a client that disconnects ends the
stream, which aborts the request in the engine and frees its KV blocks. A request naming
a prefill worker first gets its prompt's KV from there (RemotePrefill). /live answers as
soon as the process serves HTTP; /health, /info and /generate answer 503 until the model
has loaded and, on a prefill worker, the KV port listens.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from splitserve.engine.llm_engine import CapacityError, RequestError
from splitserve.engine.types import RequestOutput, SamplingError
from splitserve.metrics import WorkerMetrics
from splitserve.transfer.config import TransferStats
from splitserve.worker import protocol as p
from splitserve.worker.async_engine import AsyncEngine, EngineDeadError, EngineState
from splitserve.worker.config import WorkerConfig
from splitserve.worker.kv_port import KVPort
from splitserve.worker.remote_prefill import RemotePrefill, TransferFailed

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


def _reply(status: int, msg: msgspec.Struct) -> Response:
    return Response(p.encode(msg), status_code=status, media_type="application/json")


def _not_ready(engine: AsyncEngine) -> Response:
    if engine.state is EngineState.LOADING:
        return _reply(503, p.WorkerHealth("loading", "the model is loading"))
    return _reply(503, p.WorkerHealth("failed", engine.failure))


def create_app(engine: AsyncEngine, config: WorkerConfig, worker_id: str) -> FastAPI:
    role = config.role
    transfer_stats = TransferStats()
    metrics = WorkerMetrics(engine.stats, transfer_stats)
    registry = metrics.registry
    kv_port = KVPort(engine, config, transfer_stats) if role == "prefill" else None
    remote = RemotePrefill(engine, config, transfer_stats, metrics.kv_transfer_seconds.observe)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # The engine (and so the model load) starts once the server is accepting
        # connections, so /live and /health answer during a long load.
        engine.start()
        if kv_port is not None:
            kv_port.start_when_ready()
        yield
        if kv_port is not None:
            kv_port.close()
        engine.stop()

    def not_serving() -> Response | None:
        if engine.state is not EngineState.READY:
            return _not_ready(engine)
        if kv_port is not None and kv_port.address is None:
            return _reply(503, p.WorkerHealth("loading", kv_port.status()))
        return None

    app = FastAPI(title="splitserve worker", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/live")
    async def live() -> Response:
        return _reply(200, p.WorkerHealth("ok"))

    @app.get("/health")
    async def health() -> Response:
        return not_serving() or _reply(200, p.WorkerHealth("ok"))

    @app.get("/info")
    async def info() -> Response:
        if (refusal := not_serving()) is not None:
            return refusal
        e = engine.engine
        kv_host, kv_port_number = kv_port.address if kv_port is not None else (None, None)
        return _reply(200, p.WorkerInfo(
            role=role, model_name=e.model_name, model_dir=str(e.model_dir),
            max_model_len=e.max_model_len, block_size=e.config.block_size,
            eos_token_ids=list(e.eos_token_ids), worker_id=worker_id, kv_host=kv_host,
            kv_port=kv_port_number))

    @app.get("/stats")
    async def stats() -> Response:
        s = engine.stats()
        if s is None:
            return _not_ready(engine)
        return Response(msgspec.json.encode(s), media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        if (refusal := not_serving()) is not None:
            return refusal
        if role == "prefill":
            return _reply(400, p.WorkerError(
                "this is a prefill worker: it serves KV on its KV port; send generate "
                "requests to a decode (or both) worker naming it as the prefill target"))
        try:
            req = p.decode(await request.body(), p.GenerateRequest)
            params = req.sampling.to_params()
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return _reply(400, p.WorkerError(f"invalid generate request: {e}"))
        except SamplingError as e:
            return _reply(400, p.WorkerError(str(e), e.param))
        try:
            if req.prefill is None:
                outputs = await engine.add(req.request_id, req.prompt_token_ids, params)
            else:
                outputs = await remote.run(req.request_id, req.prompt_token_ids, params, req.prefill)
        except (RequestError, SamplingError) as e:
            logger.info("request_id=%s refused: %s", req.request_id, e)
            return _reply(400, p.WorkerError(str(e), e.param))
        except CapacityError as e:
            logger.warning("request_id=%s refused: %s", req.request_id, e)
            return _reply(503, p.WorkerError(str(e), code="capacity"))
        except TransferFailed as e:
            return _reply(502, p.WorkerError(str(e), code="kv_transfer"))
        except EngineDeadError as e:
            return _reply(503, p.WorkerHealth("failed", str(e)))
        logger.info("request_id=%s admitted: %d prompt tokens, max_tokens=%d",
                    req.request_id, len(req.prompt_token_ids), params.max_tokens)
        return StreamingResponse(_ndjson(req.request_id, outputs), media_type=NDJSON)

    return app


async def _ndjson(request_id: str, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
    generated = 0
    try:
        async for out in outputs:
            generated += len(out.new_token_ids)
            reason = out.finish_reason.value if out.finished and out.finish_reason else None
            if out.finished:
                logger.info("request_id=%s finished: %s after %d tokens (%d prompt tokens cached)",
                            request_id, reason, generated, out.num_cached_tokens)
            yield p.encode_line(p.GenerateChunk(
                new_token_ids=out.new_token_ids, finish_reason=reason,
                num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
                num_transferred_tokens=out.num_transferred_tokens))
    except EngineDeadError as e:
        logger.error("request_id=%s failed: %s", request_id, e)
        yield p.encode_line(p.GenerateChunk(error=str(e)))
