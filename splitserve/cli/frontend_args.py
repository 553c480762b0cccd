"""Frontend flags shared by `serve` and `frontend` (router policy, overlap weight,
migration limit), with defaults read from RouterConfig / FrontendConfig, and the reverse,
args -> flags, for serve's frontend child."""

from __future__ import annotations

import argparse

from splitserve.frontend.config import FrontendConfig
from splitserve.router import POLICIES, RouterConfig


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing")
    router, frontend = RouterConfig(), FrontendConfig()
    group.add_argument("--router", choices=POLICIES, default=router.policy,
                       help="how workers are picked: kv (prefill where the prompt's prefix is "
                            "cached, weighed against queued work; decode by load and free KV), "
                            "round-robin or random (default: %(default)s)")
    group.add_argument("--kv-overlap-weight", type=float, default=router.overlap_weight,
                       metavar="W", help="kv router: blocks of queued prefill work one cached "
                                         "prompt block is worth (default: %(default)s)")
    group.add_argument("--migration-limit", type=int, default=frontend.migration_limit,
                       metavar="N", help="times a request may move to another decode worker "
                                         "when its own dies mid-stream (default: %(default)s)")
    parser.add_argument("--max-request-bytes", type=int, default=frontend.max_request_bytes,
                        metavar="N", help="largest API request body accepted; a larger one is "
                                          "answered 413 (default: %(default)s)")


def frontend_config_from_args(parser: argparse.ArgumentParser,
                              args: argparse.Namespace) -> FrontendConfig:
    try:
        return FrontendConfig(router=RouterConfig(args.router, args.kv_overlap_weight),
                              migration_limit=args.migration_limit,
                              max_request_bytes=args.max_request_bytes)
    except ValueError as e:
        parser.error(str(e))


def frontend_argv(args: argparse.Namespace) -> list[str]:
    return ["--router", args.router, "--kv-overlap-weight", repr(args.kv_overlap_weight),
            "--migration-limit", str(args.migration_limit),
            "--max-request-bytes", str(args.max_request_bytes)]
