"""Frontend flags shared by `serve` and `frontend` (router policy, overlap weight,
migration limit, admission queue, prefill overflow, API key, reasoning parser), with
defaults read from RouterConfig / FrontendConfig, and the reverse, args -> flags, for
serve's frontend child (all but the API key, which travels in its environment: a command
line is visible to `ps`)."""

from __future__ import annotations

import argparse
import os

from splitserve.frontend.auth import API_KEY_ENV
from splitserve.frontend.config import (PREFILL_OVERFLOW, REASONING_PARSERS, TOOL_CALL_PARSERS,
                                        FrontendConfig)
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
    queue = parser.add_argument_group("backpressure")
    queue.add_argument("--max-queued-requests", type=int, default=frontend.max_queued_requests,
                       metavar="N", help="requests that may wait, in arrival order, for a worker "
                                         "to take them; one more is answered 429 "
                                         "(default: %(default)s)")
    queue.add_argument("--queue-timeout", type=float, default=frontend.queue_timeout_s,
                       metavar="SECONDS", help="how long a request may wait in that queue before "
                                               "it is answered 503 (default: %(default)s)")
    queue.add_argument("--prefill-overflow", choices=PREFILL_OVERFLOW,
                       default=frontend.prefill_overflow,
                       help="when no prefill worker is ready, or all expect a wait above "
                            "--max-prefill-wait: local (a decode worker computes the prompt "
                            "itself) or queue (wait for a prefill worker) (default: %(default)s)")
    queue.add_argument("--max-prefill-wait", type=float, default=frontend.max_prefill_wait_s,
                       metavar="SECONDS", help="a prefill worker whose queued prompt tokens / "
                                               "measured rate exceed this is saturated "
                                               "(default: never; requests wait in its queue)")
    api = parser.add_argument_group("API")
    api.add_argument("--api-key", default=frontend.api_key, metavar="KEY",
                     help="clients must send Authorization: Bearer KEY to every route but "
                          f"/live, /health and /metrics (default: ${API_KEY_ENV}; unset: open)")
    api.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                     default=frontend.reasoning_parser,
                     help="split chat output into reasoning_content (inside <think>...</think>) "
                          "and content, as vLLM's parser of that name (default: off)")
    api.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                     default=frontend.tool_call_parser,
                     help="how the model writes tool calls, parsed into tool_calls as vLLM's "
                          "parser of that name (default: off)")
    api.add_argument("--enable-auto-tool-choice", action="store_true",
                     default=frontend.enable_auto_tool_choice,
                     help='serve tool_choice "auto" (the default when tools are given): the '
                          "model decides, --tool-call-parser reads its calls")
    api.add_argument("--tokenizer", default=frontend.tokenizer, metavar="DIR",
                     help="directory with the model's tokenizer and chat template (default: "
                          "fetched from a ready worker, so this host needs no model files)")


def frontend_config_from_args(parser: argparse.ArgumentParser,
                              args: argparse.Namespace) -> FrontendConfig:
    try:
        return FrontendConfig(router=RouterConfig(args.router, args.kv_overlap_weight),
                              migration_limit=args.migration_limit,
                              max_request_bytes=args.max_request_bytes,
                              max_queued_requests=args.max_queued_requests,
                              queue_timeout_s=args.queue_timeout,
                              prefill_overflow=args.prefill_overflow,
                              max_prefill_wait_s=args.max_prefill_wait,
                              api_key=api_key_from_env(args.api_key),
                              reasoning_parser=args.reasoning_parser,
                              tool_call_parser=args.tool_call_parser,
                              enable_auto_tool_choice=args.enable_auto_tool_choice,
                              tokenizer=args.tokenizer)
    except ValueError as e:
        parser.error(str(e))


def api_key_from_env(value: str | None) -> str | None:
    return value if value is not None else (os.environ.get(API_KEY_ENV) or None)


def frontend_argv(args: argparse.Namespace) -> list[str]:
    return ["--router", args.router, "--kv-overlap-weight", repr(args.kv_overlap_weight),
            "--migration-limit", str(args.migration_limit),
            "--max-request-bytes", str(args.max_request_bytes),
            "--max-queued-requests", str(args.max_queued_requests),
            "--queue-timeout", repr(args.queue_timeout), "--prefill-overflow", args.prefill_overflow,
            *([] if args.max_prefill_wait is None else ["--max-prefill-wait", repr(args.max_prefill_wait)]),
            *([] if args.reasoning_parser is None else ["--reasoning-parser", args.reasoning_parser]),
            *([] if args.tool_call_parser is None else ["--tool-call-parser", args.tool_call_parser]),
            *(["--enable-auto-tool-choice"] if args.enable_auto_tool_choice else []),
            *([] if args.tokenizer is None else ["--tokenizer", args.tokenizer])]
