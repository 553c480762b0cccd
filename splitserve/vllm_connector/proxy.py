"""`splitserve vllm-proxy`: disaggregate two plain `vllm serve` processes that use
SplitserveConnector, without splitserve's frontend (the same job as vLLM's toy proxy for
NixlConnector, but P and D are asked at the same time: D pulls blocks while P computes).

Per completion request: one transfer id X; P gets the request with max_tokens 1 and
{"do_remote_decode": true, "transfer_id": X}; D gets it unchanged plus
{"do_remote_prefill": true, "transfer_id": X, "remote_host", "remote_port"} (P's KV
server, `--prefill-kv`); D's answer, streamed or not, goes back to the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import uuid

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from splitserve.disconnect import ClosingStreamingResponse
from splitserve.config import ConfigError
from splitserve.vllm_connector.proxy_args import ProxyConfig, config_from_args

log = logging.getLogger(__name__)


def make_app(cfg: ProxyConfig) -> Starlette:
    client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout, connect=10.0))

    async def prefill(path: str, body: dict, tid: str) -> None:
        p_body = dict(body, stream=False, max_tokens=1, n=1,
                      kv_transfer_params={"do_remote_decode": True, "transfer_id": tid})
        p_body.pop("stream_options", None)
        if "max_completion_tokens" in p_body:
            p_body["max_completion_tokens"] = 1
        try:
            r = await client.post(cfg.prefill.rstrip("/") + path, json=p_body)
            if r.status_code != 200:
                log.warning("request_id=%s prefill answered %d: %s", tid, r.status_code,
                            r.text[:500])
        except httpx.HTTPError as e:
            log.warning("request_id=%s prefill request failed: %r; decode will recompute", tid, e)

    async def completion(request: Request) -> Response:
        body = await request.json()
        tid = f"xfer-{uuid.uuid4().hex}"
        d_body = dict(body, kv_transfer_params={
            "do_remote_prefill": True, "transfer_id": tid,
            "remote_host": cfg.prefill_kv_host, "remote_port": cfg.prefill_kv_port})
        p_task = asyncio.create_task(prefill(request.url.path, body, tid))
        log.info("request_id=%s %s: prefill %s, decode %s", tid, request.url.path,
                 cfg.prefill, cfg.decode)
        d_req = client.build_request("POST", cfg.decode.rstrip("/") + request.url.path,
                                     json=d_body)
        try:
            d_resp = await client.send(d_req, stream=True)
        except httpx.HTTPError as e:
            p_task.cancel()
            return JSONResponse({"error": {"message": f"decode server unreachable: {e!r}",
                                           "type": "proxy_error"}}, status_code=502)

        async def relay():
            try:
                async for chunk in d_resp.aiter_raw():
                    yield chunk
            finally:
                await d_resp.aclose()
                await p_task

        return ClosingStreamingResponse(relay(), status_code=d_resp.status_code,
                                 media_type=d_resp.headers.get("content-type"))

    async def models(request: Request) -> Response:
        r = await client.get(cfg.decode.rstrip("/") + "/v1/models")
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    async def health(request: Request) -> Response:
        bad = []
        for url in (cfg.prefill, cfg.decode):
            try:
                if (await client.get(url.rstrip("/") + "/health")).status_code != 200:
                    bad.append(url)
            except httpx.HTTPError:
                bad.append(url)
        return JSONResponse({"unhealthy": bad}, status_code=503 if bad else 200)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(routes=[
        Route("/v1/completions", completion, methods=["POST"]),
        Route("/v1/chat/completions", completion, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
    ], lifespan=lifespan)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from splitserve.cli.http_server import HttpServer
    from splitserve.cli.logs import configure_logging

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    configure_logging("vllm-proxy", args.log_level)
    HttpServer(make_app(cfg), args.host, args.port).run(port_file=args.port_file)
    return 0
