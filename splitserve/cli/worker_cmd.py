"""`splitserve worker`: one engine behind the internal HTTP API.

The HTTP server starts first and the model loads behind it, so /live and /health (503,
"loading") answer during a long load. If the load or the engine fails, or discovery
refuses the registration, the process exits with status 1, so a supervisor notices.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from splitserve.cli.discovery_args import discovery_from_args
from splitserve.cli.engine_args import engine_config_from_args, worker_config_from_args
from splitserve.cli.http_server import HttpServer
from splitserve.cli.logs import configure_logging
from splitserve.cli.supervisor import RESTARTS_ENV
from splitserve.cli.vllm_args import connector_from_args, vllm_options_from_args

logger = logging.getLogger(__name__)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = engine_config_from_args(parser, args)
    worker_config = worker_config_from_args(parser, args)
    discovery = discovery_from_args(parser, args)
    worker_id = args.worker_id or f"{worker_config.role}-{socket.gethostname()}-{os.getpid()}"
    if "/" in worker_id:
        parser.error(f"--worker-id must not contain '/', got {worker_id!r}")
    # Set by `serve` when it restarts this worker after a crash; shown in /cluster.
    restarts = os.environ.get(RESTARTS_ENV, "0")
    if not restarts.isdigit():
        parser.error(f"${RESTARTS_ENV} must be a non-negative integer, got {restarts!r}")
    vllm_options = vllm_options_from_args(parser, args, worker_config.role)
    connector = connector_from_args(parser, worker_config, vllm_options, discovery is not None)
    # The role in every line: in `serve`'s combined output prefill and decode lines differ.
    configure_logging(f"worker {worker_config.role}", args.log_level)
    # Heavy imports (torch, the model code) after argument errors had their chance.
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.worker.app import create_app
    from splitserve.worker.async_engine import AsyncEngine
    from splitserve.worker.kv_events import KVEventPublisher
    from splitserve.worker.registration import WorkerRegistration

    exit_code = 0

    def on_fatal(reason: str) -> None:
        nonlocal exit_code
        exit_code = 1
        logger.error("worker stopping: %s", reason)
        server.request_exit()

    # A prefill worker's KV lives in shared memory when same-host decode workers may map
    # it (the one-copy shm transport); anywhere else ordinary memory is as good.
    kv_allocator = None
    if worker_config.role == "prefill" and worker_config.transfer.transport != "tcp" \
            and config.device == "cpu":
        from splitserve.transfer.shmfile import allocate_shared_kv as kv_allocator

    publisher = KVEventPublisher(worker_id)
    if vllm_options is not None:
        from splitserve.worker.vllm_engine import VllmEngine
        engine = VllmEngine(config, vllm_options, on_fatal, on_kv_events=publisher.publish,
                            connector=connector)
    else:
        engine = AsyncEngine(lambda: LLMEngine(config, kv_allocator=kv_allocator), on_fatal,
                             on_kv_events=publisher.publish)
    registration = None
    if discovery is not None:
        registration = WorkerRegistration(discovery, worker_id, worker_config.role,
                                          worker_config.advertised_host(), args.discovery_ttl, on_fatal,
                                          restarts=int(restarts))
    app = create_app(engine, worker_config, worker_id, publisher, registration)
    server = HttpServer(app, args.host, args.port, on_shutdown=app.state.begin_shutdown)
    if registration is not None:
        registration.api_port = server.port
    logger.info("worker %s (role %s) listening on http://%s:%d; loading the model", worker_id,
                args.role, server.host, server.port)
    server.run(args.port_file)
    return exit_code
