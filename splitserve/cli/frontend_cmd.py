"""`splitserve frontend`: the OpenAI-compatible server in front of the workers it finds in
discovery (--discovery), or of a fixed list (--worker-url)."""

from __future__ import annotations

import argparse
import logging

from splitserve.cli.discovery_args import discovery_from_args
from splitserve.cli.frontend_args import frontend_config_from_args
from splitserve.cli.http_server import HttpServer
from splitserve.cli.logs import configure_logging

logger = logging.getLogger(__name__)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from dataclasses import replace

    from splitserve.worker.config import secret_from_env
    config = replace(frontend_config_from_args(parser, args),
                     worker_secret=secret_from_env(args.kv_secret))
    discovery = discovery_from_args(parser, args)
    if args.worker_url:
        if discovery is not None:
            parser.error("give --discovery or --worker-url, not both")
        from splitserve.discovery import DiscoveryError, StaticDiscovery, StaticDiscoveryConfig
        try:
            discovery = StaticDiscovery(StaticDiscoveryConfig(tuple(args.worker_url)))
        except DiscoveryError as e:
            parser.error(str(e))
        where = ", ".join(args.worker_url)
    elif discovery is None:
        parser.error("the frontend needs workers: --discovery URL (file:DIR, etcd://HOST:PORT) "
                     "or --worker-url URL")
    else:
        where = f"{args.discovery} (namespace {args.namespace})"
    configure_logging("frontend", args.log_level)
    from splitserve.frontend.app import create_app

    server = HttpServer(create_app(discovery, config), args.host, args.port)
    logger.info("frontend listening on http://%s:%d, router %s, workers from %s, API key %s",
                server.host, server.port, config.router.policy, where,
                "required" if config.api_key else "off")
    server.run(args.port_file)
    return 0
