"""Frontend flags shared by `serve` and `frontend` (router policy, overlap weight,
migration limit, admission queue, prefill overflow, API key, reasoning and tool-call
parsers, tokenizer), generated from RouterConfig / FrontendConfig (config_flags.py); and
the reverse, args -> flags, for serve's frontend child (all but the API key, which travels
in its environment: a command line is visible to `ps`)."""

from __future__ import annotations

import argparse
import os

from splitserve.cli import config_flags
from splitserve.frontend.auth import API_KEY_ENV
from splitserve.frontend.config import FrontendConfig
from splitserve.router import RouterConfig

_ROUTING = ("migration_limit",)
_BACKPRESSURE = ("max_queued_requests", "queue_timeout_s", "prefill_overflow", "max_prefill_wait_s")
_API = ("max_request_bytes", "api_key", "reasoning_parser", "tool_call_parser",
        "enable_auto_tool_choice", "tokenizer")


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    routing = parser.add_argument_group("routing")
    config_flags.add_flags(routing, RouterConfig)
    config_flags.add_flags(routing, FrontendConfig, only=_ROUTING)
    config_flags.add_flags(parser.add_argument_group("backpressure"), FrontendConfig, only=_BACKPRESSURE)
    config_flags.add_flags(parser.add_argument_group("API"), FrontendConfig, only=_API)


def frontend_config_from_args(parser: argparse.ArgumentParser,
                              args: argparse.Namespace) -> FrontendConfig:
    try:
        given = config_flags.values(FrontendConfig, args)
        given["api_key"] = api_key_from_env(given["api_key"])
        return FrontendConfig(router=RouterConfig(**config_flags.values(RouterConfig, args)), **given)
    except ValueError as e:
        parser.error(str(e))


def api_key_from_env(value: str | None) -> str | None:
    return value if value is not None else (os.environ.get(API_KEY_ENV) or None)


def frontend_argv(args: argparse.Namespace) -> list[str]:
    return [*config_flags.argv(RouterConfig, config_flags.values(RouterConfig, args)),
            *config_flags.argv(FrontendConfig, config_flags.values(FrontendConfig, args))]
