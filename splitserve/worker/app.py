"""The worker's internal HTTP API (frontend -> worker), over one AsyncEngine.

POST /generate streams NDJSON GenerateChunk lines; a client that disconnects ends the
stream, which aborts the request in the engine and frees its KV blocks. /live answers as
soon as the process serves HTTP; /health, /info and /generate answer 503 until the model
has loaded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from splitserve.engine.llm_engine import RequestError
from splitserve.engine.types import RequestOutput, SamplingError
from splitserve.metrics import worker_registry
from splitserve.worker import protocol as p
from splitserve.worker.async_engine import AsyncEngine, EngineDeadError, EngineState

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


def _reply(status: int, msg: msgspec.Struct) -> Response:
    return Response(p.encode(msg), status_code=status, media_type="application/json")


def _not_ready(engine: AsyncEngine) -> Response:
    if engine.state is EngineState.LOADING:
        return _reply(503, p.WorkerHealth("loading", "the model is loading"))
    return _reply(503, p.WorkerHealth("failed", engine.failure))


def create_app(engine: AsyncEngine, role: str) -> FastAPI:
    registry = worker_registry(engine.stats)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # The engine (and so the model load) starts once the server is accepting
        # connections, so /live and /health answer during a long load.
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="splitserve worker", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/live")
    async def live() -> Response:
        return _reply(200, p.WorkerHealth("ok"))

    @app.get("/health")
    async def health() -> Response:
        if engine.state is not EngineState.READY:
            return _not_ready(engine)
        return _reply(200, p.WorkerHealth("ok"))

    @app.get("/info")
    async def info() -> Response:
        if engine.state is not EngineState.READY:
            return _not_ready(engine)
        e = engine.engine
        return _reply(200, p.WorkerInfo(
            role=role, model_name=e.model_name, model_dir=str(e.model_dir),
            max_model_len=e.max_model_len, block_size=e.config.block_size,
            eos_token_ids=list(e.eos_token_ids)))

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
        if engine.state is not EngineState.READY:
            return _not_ready(engine)
        try:
            req = p.decode(await request.body(), p.GenerateRequest)
            params = req.sampling.to_params()
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return _reply(400, p.WorkerError(f"invalid generate request: {e}"))
        except SamplingError as e:
            return _reply(400, p.WorkerError(str(e), e.param))
        try:
            outputs = await engine.add(req.request_id, req.prompt_token_ids, params)
        except RequestError as e:
            logger.info("request_id=%s refused: %s", req.request_id, e)
            return _reply(400, p.WorkerError(str(e), e.param))
        except SamplingError as e:
            return _reply(400, p.WorkerError(str(e), e.param))
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
                num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens))
    except EngineDeadError as e:
        logger.error("request_id=%s failed: %s", request_id, e)
        yield p.encode_line(p.GenerateChunk(error=str(e)))
