"""`splitserve frontend`: the OpenAI-compatible server in front of one or more workers."""

from __future__ import annotations

import argparse
import logging

from splitserve.cli.http_server import HttpServer
from splitserve.cli.logs import configure_logging

logger = logging.getLogger(__name__)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    configure_logging("frontend", args.log_level)
    from splitserve.frontend.app import create_app

    server = HttpServer(create_app(args.worker_url), args.host, args.port)
    logger.info("frontend listening on http://%s:%d, workers: %s", server.host, server.port,
                ", ".join(args.worker_url))
    server.run(args.port_file)
    return 0
