"""The OpenAI-compatible frontend: /v1/chat/completions, /v1/completions, /v1/models,
/tokenize, /detokenize, /live, /health, /metrics, and GET /cluster (the workers as the
frontend sees them); with an API key all but the probes and metrics need it (auth.py).

Its workers come from discovery (a static list for `--worker-url`). It serves whatever
model they serve: the model name, max_model_len, block size and the tokenizer's
directory come from the first ready worker's /info; the router (policy, KV index fed by
the workers' KV events) is built then; until then every API call answers 503 with the
reason. /health says whether a request can be served now (a ready prefill+decode pair, a
ready `both` worker, or with `--prefill-overflow local` a ready decode worker alone, see
routing.py). A request no worker can take yet waits in the admission queue
(admission.py: FIFO, bounded, 429 when full, 503 past its wait limit); a client that
disconnects meanwhile leaves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from splitserve.discovery.base import Discovery
from splitserve.disconnect import ClosingStreamingResponse, unless_disconnected
from splitserve.frontend.config import FrontendConfig
from splitserve.frontend.admission import AdmissionQueue
from splitserve.frontend.auth import ApiKeyAuth
from splitserve.frontend.choices import MAX_N, child_request, start_all
from splitserve.frontend.completion_options import echo_only, echo_text, generations
from splitserve.frontend.errors import OpenAIError, bad_request, unavailable
from splitserve.frontend.generation import CLIENT_GONE, Generation
from splitserve.frontend.kv_events import KVEventFeed
from splitserve.frontend.logprobs import LogprobsFormatter
from splitserve.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from splitserve.frontend.preprocess import Preprocessor
from splitserve.frontend.reasoning import splitter_for
from splitserve.frontend.request_body import parse_body, read_body
from splitserve.frontend.request_ids import RequestIdMiddleware
from splitserve.frontend.responses import CHAT, COMPLETION, Choice, Shape, full_response, stream_events
from splitserve.frontend.routing import LOCAL_PREFILL_REASONS, RoutePlanner, unavailable_reason
from splitserve.frontend.tokenize_api import detokenize_route, tokenize_route
from splitserve.frontend.tokenizer_source import TokenizerUnavailable, load_tokenizer
from splitserve.frontend.tools import plan_request
from splitserve.frontend.worker_client import WorkerClient
from splitserve.frontend.workers import WorkerStatus
from splitserve.metrics import FrontendMetrics
from splitserve.router import KVIndex, make_policy
from splitserve.worker import protocol as p

logger = logging.getLogger(__name__)


class Frontend:
    """State shared by the routes: the workers, the router and tokenizer once the model is
    known, the metrics."""

    def __init__(self, discovery: Discovery, config: FrontendConfig,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.client = WorkerClient(discovery, config.poll_interval_s, on_change=self._workers_changed,
                                   secret=config.worker_secret, transport=transport)
        self.registry = CollectorRegistry()
        self.metrics = FrontendMetrics(self.registry)
        self.admission = AdmissionQueue(config.max_queued_requests, config.queue_timeout_s,
                                        self.metrics)
        self.planner: RoutePlanner | None = None
        self.kv_feed: KVEventFeed | None = None
        self.tokenizer = None
        self.preprocessor: Preprocessor | None = None
        self.info: p.WorkerInfo | None = None
        self.tokenizer_error: str | None = None

    def _workers_changed(self, workers: list[WorkerStatus]) -> None:
        self.admission.notify()     # a worker's state or load changed: queued requests retry
        if self.kv_feed is not None:
            self.kv_feed.sync(workers)

    async def load_model_info(self) -> None:
        await self.client.first_ready.wait()
        info = self.client.info()
        # KV events and the index name blocks by the engine's chained hashes over blocks
        # of the workers' block size, which only a worker can say.
        index = KVIndex(info.block_size)
        self.planner = RoutePlanner(make_policy(self.config.router, index), index, self.metrics,
                                    self.config.prefill_overflow, self.config.max_prefill_wait_s,
                                    on_settle=self.admission.notify)
        self.kv_feed = KVEventFeed(self.client.http, index)
        self.kv_feed.sync(self.client.workers())
        # From --tokenizer or a worker: the model's files need not be on this host.
        try:
            tok = await load_tokenizer(self.config.tokenizer, self.client, self.config.poll_interval_s)
        except TokenizerUnavailable as e:
            logger.error("%s", e)
            self.tokenizer_error = str(e)
            return
        self.tokenizer, self.info = tok, info
        self.preprocessor = Preprocessor(tok, info.max_model_len)
        logger.info("serving model %s (max_model_len %d, block size %d), router %s",
                    info.model_name, info.max_model_len, info.block_size, self.config.router.policy)

    async def close(self) -> None:
        if self.kv_feed is not None:
            await self.kv_feed.close()
        await self.client.close()

    def count_workers(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for w in self.client.workers():
            key = (w.role or "unknown", w.state_name)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def unavailable_reason(self) -> str | None:
        if self.tokenizer_error:
            return self.tokenizer_error
        reason = unavailable_reason(self.client.workers(), self.config.prefill_overflow == "local")
        if reason is None and self.preprocessor is None:
            return "loading the tokenizer"
        return reason

    def require_model(self) -> tuple[Preprocessor, p.WorkerInfo]:
        """The model once it is known (a worker was ready once and the tokenizer loaded);
        later requests wait in the admission queue while no worker can take them."""
        if self.preprocessor is None:
            raise unavailable(f"the server is not ready: {self.unavailable_reason()}")
        return self.preprocessor, self.info

    def overflow_json(self) -> dict:
        """The prefill overflow policy and its local-prefill decisions, for GET /cluster."""
        counts = self.planner.local_prefills if self.planner is not None else \
            dict.fromkeys(LOCAL_PREFILL_REASONS, 0)
        return {"policy": self.config.prefill_overflow,
                "max_prefill_wait_s": self.config.max_prefill_wait_s, "local_prefills": dict(counts)}


async def _parse(request: Request, model_cls: type[BaseModel]):
    """The validated body (request_body.py: size limit, 413, parsed off the loop if big)."""
    data = await read_body(request, request.app.state.frontend.config.max_request_bytes)
    return await parse_body(data, model_cls)


def create_app(discovery: Discovery, config: FrontendConfig | None = None, *,
               transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """transport: how the workers are reached (None: HTTP; tests pass httpx.MockTransport
    to fake workers behind the real frontend)."""
    fe = Frontend(discovery, config or FrontendConfig(), transport)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await fe.client.start()
        loader = asyncio.create_task(fe.load_model_info())
        yield
        loader.cancel()
        await fe.close()

    app = FastAPI(title="splitserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Added first, so it runs inside the request-id middleware: a 401 has an x-request-id.
    app.add_middleware(ApiKeyAuth, api_key=fe.config.api_key,
                       on_refused=lambda: fe.metrics.requests.labels(status="401").inc())
    app.add_middleware(RequestIdMiddleware)
    app.state.frontend = fe

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, e: OpenAIError) -> Response:
        fe.metrics.requests.labels(status=str(e.status)).inc()
        return e.response()

    @app.get("/live")
    async def live() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/health")
    async def health() -> Response:
        reason = fe.unavailable_reason()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/cluster")
    async def cluster() -> Response:
        # For operators and tools: every discovered worker, ready or not, and why not.
        reason = fe.unavailable_reason()
        return JSONResponse({"status": "ok" if reason is None else "unavailable", "reason": reason,
                             "router": fe.config.router.policy, "queue": fe.admission.snapshot(),
                             "prefill_overflow": fe.overflow_json(),
                             "workers": [w.to_json() for w in fe.client.workers()]})

    @app.get("/metrics")
    async def metrics() -> Response:
        fe.metrics.set_workers(fe.count_workers())
        return Response(generate_latest(fe.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        _, info = fe.require_model()
        return JSONResponse({"object": "list", "data": [{
            "id": info.model_name, "object": "model", "created": 0, "owned_by": "splitserve",
            "root": info.model_dir, "max_model_len": info.max_model_len}]})

    app.add_api_route("/tokenize", tokenize_route, methods=["POST"])
    app.add_api_route("/detokenize", detokenize_route, methods=["POST"])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, ChatCompletionRequest, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, CompletionRequest, COMPLETION)

    async def _complete(request: Request, model_cls: type[BaseModel], shape: Shape) -> Response:
        arrival = time.monotonic()
        body = await _parse(request, model_cls)
        pre, info = fe.require_model()
        if body.model is not None and body.model != info.model_name:
            raise OpenAIError(404, f"The model `{body.model}` does not exist.", "model")
        if (name := body.unsupported()) is not None:
            raise bad_request(f"'{name}' is not supported by this server", name)
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options can only be given when stream is true", "stream_options")
        if not 1 <= body.n <= MAX_N:
            raise bad_request(f"n must be in [1, {MAX_N}], got {body.n}", "n")
        num_sequences = generations(body, body.n)
        structure, tools = await plan_request(body, shape.chat, fe.config.tool_call_parser,
                                              fe.config.enable_auto_tool_choice)
        prompt = await pre.prompt(body, shape.chat)
        echo = echo_text(body, fe.tokenizer, prompt)
        request_id = request.state.request_id
        if echo and body.max_tokens == 0:
            fe.metrics.requests.labels(status="200").inc()
            return echo_only(request_id, info.model_name, echo, len(prompt), body.stream,
                             body.include_usage)
        sampling = msgspec.structs.replace(pre.sampling(body, len(prompt), shape.chat),
                                           structured=structure)
        if num_sequences > body.n and sampling.logprobs is None:
            # best_of ranks by the sampled tokens' logprobs, shown only if asked for.
            sampling = msgspec.structs.replace(sampling, logprobs=0)
        whole = p.GenerateRequest(request_id, prompt, sampling)
        gens = [Generation(fe.client, fe.planner, fe.tokenizer, fe.metrics, child_request(whole, i),
                           body.stop_list(), arrival, fe.config.migration_limit, admission=fe.admission)
                for i in range(num_sequences)]
        # A request waiting in the admission queue (or for its decode worker) leaves at
        # once when its client does.
        started, _ = await unless_disconnected(request, start_all(gens))
        if not started:
            fe.metrics.requests.labels(status=CLIENT_GONE).inc()
            logger.info("request_id=%s client disconnected before a worker took it", request_id)
            return Response(status_code=int(CLIENT_GONE))
        choices = [Choice(i, gen, splitter_for(fe.config.reasoning_parser, fe.tokenizer, prompt)
                          if shape.chat else None,
                          LogprobsFormatter(fe.tokenizer, shape.chat)
                          if body.requested_logprobs() is not None else None,
                          tools.output() if tools is not None else None, echo)
                   for i, gen in enumerate(gens)]
        if body.stream:
            return ClosingStreamingResponse(stream_events(shape, choices, info.model_name, body.include_usage),
                                     media_type="text/event-stream")
        return await full_response(shape, choices, info.model_name,
                                   keep=body.n if num_sequences > body.n else None)

    return app
