"""Engine flags shared by `serve` and `worker`, with defaults read from EngineConfig so a
default lives in exactly one place; and the reverse, config -> flags, for child processes."""

from __future__ import annotations

import argparse
from dataclasses import fields

from splitserve.config import DTYPES, ConfigError, EngineConfig, defaults, parse_size
from splitserve.transfer.config import TRANSPORTS, TransferConfig
from splitserve.worker.config import SECRET_ENV, WorkerConfig, secret_from_env
from splitserve.worker.protocol import FALLBACKS

_HELP = {
    "model": "Hugging Face checkpoint directory (default: the embedded SmolLM2-135M-Instruct)",
    "served_model_name": "model name clients use in requests (default: derived from --model)",
    "dtype": "weights and activations dtype",
    "device": "cpu or cuda[:N]",
    "block_size": "tokens per KV cache block",
    "max_model_len": "longest sequence, prompt + output (default: the model's max_position_embeddings)",
    "max_num_seqs": "most requests in one running batch",
    "max_num_batched_tokens": "token budget of one engine step (chunked prefill beyond it)",
    "kv_cache_memory": "KV cache pool size, e.g. 2GiB (default: sized from the model)",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "seed": "engine seed for requests without their own",
    "threads": "torch threads for this engine's compute (default: one per core; serve divides "
               "the cores among the workers it starts)",
}
_TYPES = {"model": str, "served_model_name": str, "device": str, "block_size": int,
          "max_model_len": int, "max_num_seqs": int, "max_num_batched_tokens": int,
          "kv_cache_memory": parse_size, "seed": int, "threads": int}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    d = defaults(EngineConfig)
    for f in fields(EngineConfig):
        # None defaults are explained in the help text itself.
        suffix = "" if d[f.name] is None else " (default: %(default)s)"
        kw = {"default": d[f.name], "help": _HELP[f.name] + suffix}
        if f.name == "dtype":
            group.add_argument(_flag(f.name), choices=DTYPES, **kw)
        elif f.name == "enable_prefix_caching":
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(_flag(f.name), type=_TYPES[f.name], **kw)


def engine_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EngineConfig:
    try:
        return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})
    except ConfigError as e:
        parser.error(str(e))


def engine_argv(config: EngineConfig) -> list[str]:
    """Flags that reproduce `config` (only the non-default values)."""
    d = defaults(EngineConfig)
    argv: list[str] = []
    for f in fields(EngineConfig):
        value = getattr(config, f.name)
        if value == d[f.name]:
            continue
        if isinstance(value, bool):
            argv.append(_flag(f.name) if value else "--no-" + _flag(f.name)[2:])
        else:
            argv += [_flag(f.name), str(value)]
    return argv


_TRANSFER_DEFAULTS = TransferConfig()
_WORKER_DEFAULTS = WorkerConfig()


def add_transfer_args(parser: argparse.ArgumentParser) -> None:
    """KV-transfer flags shared by `worker` and `serve`; defaults from TransferConfig and
    WorkerConfig."""
    g = parser.add_argument_group("kv transfer (disaggregated prefill/decode)")
    g.add_argument("--kv-transport", choices=TRANSPORTS, default=_TRANSFER_DEFAULTS.transport,
                   help="auto: shared memory when prefill and decode share a host, else tcp "
                        "(default: %(default)s)")
    g.add_argument("--kv-stall-timeout", type=float, default=_TRANSFER_DEFAULTS.stall_timeout,
                   help="seconds a prefill worker may stay silent (no KV bytes, no PROGRESS "
                        "heartbeat) before it is declared dead (default: %(default)s)")
    g.add_argument("--kv-busy-timeout", type=float, default=_TRANSFER_DEFAULTS.busy_timeout,
                   help="seconds a decode worker waits for a live but busy prefill worker to "
                        "advance a request (queued or computing) before it gives up on it "
                        "and applies --kv-fallback (default: %(default)s)")
    g.add_argument("--kv-lease", type=float, default=_TRANSFER_DEFAULTS.lease,
                   help="seconds a prefill worker keeps a request's KV pinned without an ack "
                        "or heartbeat from the decode worker (default: %(default)s)")
    g.add_argument("--kv-fallback", choices=FALLBACKS, default=_WORKER_DEFAULTS.kv_fallback,
                   help="on an unrecoverable transfer: compute the rest locally, reusing "
                        "verified blocks, or fail the request (default: %(default)s)")
    g.add_argument("--kv-secret", default=None,
                   help=f"shared secret authenticating KV sessions (default: ${SECRET_ENV})")
    g.add_argument("--advertise-host", default=None,
                   help="address peers use to reach this worker (default: --host)")
    g.add_argument("--kv-fetch-threads", type=int, default=_WORKER_DEFAULTS.kv_fetch_threads,
                   help="decode: KV fetches running at once; more wait their turn in order "
                        "(default: %(default)s)")
    g.add_argument("--kv-peers", default=None,
                   help="decode: comma-separated HOST or HOST:PORT of prefill KV ports this "
                        "worker may fetch from, for setups without --discovery (with "
                        "discovery it fetches only from prefill workers registered there)")


def transfer_argv(args: argparse.Namespace) -> list[str]:
    """Flags that reproduce the transfer options in `args` for a child worker. The
    secret travels in the child's environment, never on its command line."""
    argv = ["--kv-transport", args.kv_transport, "--kv-stall-timeout", str(args.kv_stall_timeout),
            "--kv-busy-timeout", str(args.kv_busy_timeout), "--kv-lease", str(args.kv_lease),
            "--kv-fallback", args.kv_fallback, "--kv-fetch-threads", str(args.kv_fetch_threads)]
    if args.advertise_host:
        argv += ["--advertise-host", args.advertise_host]
    return argv


def parse_kv_peers(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip()) if value else ()


def worker_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> WorkerConfig:
    try:
        transfer = TransferConfig(
            stall_timeout=args.kv_stall_timeout, busy_timeout=args.kv_busy_timeout,
            lease=args.kv_lease,
            heartbeat_interval=min(_TRANSFER_DEFAULTS.heartbeat_interval, args.kv_lease / 3,
                                   args.kv_stall_timeout / 3),
            transport=args.kv_transport, secret=secret_from_env(args.kv_secret))
        return WorkerConfig(role=args.role, host=args.host, advertise_host=args.advertise_host,
                            kv_port=args.kv_port, kv_fallback=args.kv_fallback, transfer=transfer,
                            kv_fetch_threads=args.kv_fetch_threads,
                            kv_peers=parse_kv_peers(getattr(args, "kv_peers", None)))
    except ConfigError as e:
        parser.error(str(e))
