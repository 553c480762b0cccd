"""The worker's internal HTTP API (frontend -> worker), over one engine (engine_api.WorkerEngine).

POST /generate streams NDJSON GenerateChunk lines; a client that disconnects ends the
stream, which aborts the request in the engine and frees its KV blocks. A request naming
a prefill worker first gets its prompt's KV from there (RemotePrefill; on vLLM workers
through vLLM's KV connector, and a vLLM prefill worker serves POST /prefill for that:
vllm_disagg.py). GET /kv_events
streams the prefix cache's changes to routers (kv_events.py). /live answers as soon as
the process serves HTTP; /health, /info, /generate and /kv_events answer 503 until the
model has loaded and, on a prefill worker, the KV port listens. With a registration the
worker keeps its record in discovery while it runs (registration.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from splitserve.discovery import WorkerRecord
from splitserve.disconnect import ClosingStreamingResponse, unless_disconnected
from splitserve.engine.types import EngineStats, RequestOutput, SamplingError
from splitserve.metrics import WorkerMetrics
from splitserve.transfer.config import TransferStats
from splitserve.worker import protocol as p
from splitserve.worker.auth import WorkerAuth
from splitserve.worker.config import WorkerConfig
from splitserve.worker.doctor_routes import add_doctor_routes
from splitserve.worker.engine_api import (
    CapacityError, EngineDeadError, EngineState, RequestError, RequestFailed, WorkerEngine)
from splitserve.worker.incidents import IncidentLog
from splitserve.worker.kv_events import KVEventPublisher
from splitserve.worker.kv_port import KVPort
from splitserve.worker.prefill_peers import PrefillPeers, UnknownPrefillWorker
from splitserve.worker.prefill_rate import PrefillRateMeter
from splitserve.worker.registration import WorkerRegistration
from splitserve.worker.remote_prefill import RemotePrefill, TransferFailed
from splitserve.worker.tokenizer_files import TokenizerFiles
from splitserve.worker.vllm_disagg import ConnectorEngine, ConnectorKVPort, add_prefill_route
from splitserve.worker.vllm_kv_transfer import ConnectorReports
from splitserve.worker.vllm_remote_prefill import ConnectorRemotePrefill

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


def _reply(status: int, msg: msgspec.Struct) -> Response:
    return Response(p.encode(msg), status_code=status, media_type="application/json")


def _not_ready(engine: WorkerEngine) -> Response:
    if engine.state is EngineState.LOADING:
        return _reply(503, p.WorkerHealth("loading", "the model is loading"))
    return _reply(503, p.WorkerHealth("failed", engine.failure))


def create_app(engine: WorkerEngine, config: WorkerConfig, worker_id: str,
               publisher: KVEventPublisher | None = None,
               registration: WorkerRegistration | None = None) -> FastAPI:
    """publisher: the one the engine hands its KV events to (serves GET /kv_events).
    app.state.begin_shutdown() ends the event streams and withdraws the registration;
    the HTTP server calls it when a graceful shutdown starts (see HttpServer)."""
    role = config.role
    transfer_stats = TransferStats()
    incidents = IncidentLog()
    transfer_stats.on_incident = incidents.record
    metrics = WorkerMetrics(engine.stats, transfer_stats)
    registry = metrics.registry
    tokenizer_files = TokenizerFiles(engine)
    peers = PrefillPeers(registration.discovery if registration is not None else None,
                         config.kv_peers)
    if isinstance(engine, ConnectorEngine):
        # vLLM: KV moves through its KV connector, inside vLLM (vllm_disagg.py).
        engine.reports = ConnectorReports(transfer_stats, metrics.kv_transfer_seconds.observe)
        kv_port = (ConnectorKVPort(engine, config, engine.connector.kv_port)
                   if role == "prefill" else None)
        remote = ConnectorRemotePrefill(engine, config, peers)
    else:
        kv_port = KVPort(engine, config, transfer_stats) if role == "prefill" else None
        remote = RemotePrefill(engine, config, transfer_stats,
                               metrics.kv_transfer_seconds.observe, peers)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # The engine (and so the model load) starts once the server is accepting
        # connections, so /live and /health answer during a long load.
        if publisher is not None:
            publisher.start()
        engine.start()
        tokenizer_files.start_when_ready()
        if kv_port is not None:
            kv_port.start_when_ready()
        if registration is not None:
            await registration.start(describe)
        yield
        await begin_shutdown()
        remote.close()
        tokenizer_files.close()
        if kv_port is not None:
            kv_port.close()
        engine.stop()

    def not_serving() -> Response | None:
        if engine.state is not EngineState.READY:
            return _not_ready(engine)
        if kv_port is not None and kv_port.address is None:
            return _reply(503, p.WorkerHealth("loading", kv_port.status()))
        if not tokenizer_files.ready:
            return _reply(503, p.WorkerHealth("loading", "reading the tokenizer files"))
        return None

    async def begin_shutdown() -> None:
        # Idempotent: the HTTP server runs it when shutdown starts (so that routers stop
        # choosing this worker and event streams end before connections drain), and the
        # lifespan runs it again in case no server did.
        if publisher is not None:
            publisher.close()
        if registration is not None:
            await registration.stop()

    prefill_rate = PrefillRateMeter()

    def describe(base: WorkerRecord) -> WorkerRecord:
        """This worker's discovery record now: state as /health sees it, and load. Called
        every few hundred ms (registration.py), which also samples the prefill rate."""
        if engine.state is EngineState.FAILED:
            state = "failed"
        else:
            state = "ready" if not_serving() is None else "loading"
        s = engine.stats() or EngineStats()
        info = engine.info()
        kv_host, kv_port_number = (kv_port.address if kv_port is not None and kv_port.address
                                   else (None, None))
        return msgspec.structs.replace(
            base, state=state, model_name=info.model_name if info else "",
            kv_host=kv_host, kv_port=kv_port_number,
            num_requests_running=s.num_requests_running, num_requests_waiting=s.num_requests_waiting,
            num_pending_prefill_tokens=s.num_pending_prefill_tokens,
            prefill_tokens_per_s=round(prefill_rate.observe(
                time.monotonic(), s.num_computed_prompt_tokens, s.num_pending_prefill_tokens), 3),
            kv_blocks_in_use=s.kv_blocks_in_use, kv_blocks_total=s.kv_blocks_total,
            load_observed_at=time.time())

    app = FastAPI(title="splitserve worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(WorkerAuth, secret=config.transfer.secret,
                       on_refused=metrics.api_unauthorized.inc)
    app.state.begin_shutdown = begin_shutdown
    add_doctor_routes(app, worker_id, config, incidents, engine, peers)
    if isinstance(engine, ConnectorEngine) and role == "prefill":
        add_prefill_route(app, engine)

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
        e = engine.info()
        kv_host, kv_port_number = kv_port.address if kv_port is not None else (None, None)
        return _reply(200, p.WorkerInfo(
            role=role, model_name=e.model_name, model_dir=str(e.model_dir),
            max_model_len=e.max_model_len, block_size=e.block_size,
            eos_token_ids=list(e.eos_token_ids), worker_id=worker_id, kv_host=kv_host,
            kv_port=kv_port_number))

    @app.get("/tokenizer")
    async def tokenizer() -> Response:
        # The model's tokenizer and chat template, for frontends without the model files.
        if (refusal := not_serving()) is not None:
            return refusal
        if tokenizer_files.encoded is None:
            return _reply(404, p.WorkerHealth("failed", tokenizer_files.error))
        return Response(tokenizer_files.encoded, media_type="application/json")

    @app.get("/stats")
    async def stats() -> Response:
        s = engine.stats()
        if s is None:
            return _not_ready(engine)
        return Response(msgspec.json.encode(s), media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if publisher is not None:
        @app.get("/kv_events")
        async def kv_events() -> Response:
            if (refusal := not_serving()) is not None:
                return refusal
            try:
                lines = await publisher.subscribe(engine)
            except EngineDeadError as e:
                return _reply(503, p.WorkerHealth("failed", str(e)))
            return ClosingStreamingResponse(lines, media_type=NDJSON)

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
            params = req.sampling
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            # An out-of-range sampling value fails in SamplingParams.__post_init__: name it.
            param = e.__cause__.param if isinstance(e.__cause__, SamplingError) else None
            return _reply(400, p.WorkerError(f"invalid generate request: {e}", param))
        try:
            if req.prefill is None:
                outputs = await engine.add(req.request_id, req.prompt_token_ids, params)
            else:
                # A KV fetch may wait minutes on a busy prefill worker: a caller that
                # left must not keep its reservation (or the prefill) that long.
                answered, outputs = await unless_disconnected(
                    request, remote.run(req.request_id, req.prompt_token_ids, params, req.prefill))
                if not answered:
                    logger.info("request_id=%s caller disconnected before its KV arrived",
                                req.request_id)
                    return Response(status_code=499)
        except UnknownPrefillWorker as e:
            logger.warning("request_id=%s refused: %s", req.request_id, e)
            return _reply(400, p.WorkerError(str(e), e.param, code="unknown_prefill_worker"))
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
        # on_close: a caller gone before the first chunk leaves _ndjson unstarted, and
        # its cleanup with it; the abort is a no-op for a request that finished.
        return ClosingStreamingResponse(_ndjson(req.request_id, outputs), media_type=NDJSON,
                                        on_close=lambda: engine.abort(req.request_id))

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
                num_transferred_tokens=out.num_transferred_tokens, logprobs=out.logprobs))
    except (EngineDeadError, RequestFailed) as e:
        logger.error("request_id=%s failed: %s", request_id, e)
        yield p.encode_line(p.GenerateChunk(error=str(e)))
    finally:
        # Closed at a yield (the caller left), this generator does not close `outputs`,
        # whose own finally aborts the request in the engine: that must happen now, not
        # whenever the garbage collector reaches the suspended generator.
        if (close := getattr(outputs, "aclose", None)) is not None:
            await close()
