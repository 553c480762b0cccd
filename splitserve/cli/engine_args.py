"""Engine and KV-transfer flags shared by `serve` and `worker`, generated from EngineConfig,
TransferConfig and WorkerConfig (splitserve/cli/config_flags.py), so a default lives in
exactly one place; and the reverse, config -> flags, for child processes."""

from __future__ import annotations

import argparse

from splitserve.cli import config_flags
from splitserve.config import ConfigError, EngineConfig
from splitserve.transfer.config import TransferConfig
from splitserve.worker.config import WorkerConfig, secret_from_env

# The WorkerConfig options every KV-transfer user has; `worker` alone adds role and kv_port.
_WORKER_TRANSFER = ("kv_fallback", "advertise_host", "kv_fetch_threads", "kv_peers")
WORKER_ONLY = ("role", "kv_port")
_TRANSFER_DEFAULTS = TransferConfig()


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    config_flags.add_flags(parser.add_argument_group("engine"), EngineConfig)


def engine_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EngineConfig:
    try:
        return EngineConfig(**config_flags.values(EngineConfig, args))
    except ConfigError as e:
        parser.error(str(e))


def engine_argv(config: EngineConfig) -> list[str]:
    """Flags that reproduce `config` (only the non-default values)."""
    return config_flags.argv(EngineConfig, config)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """`worker`'s own flags: its role and its KV port."""
    config_flags.add_flags(parser, WorkerConfig, only=WORKER_ONLY)


def add_transfer_args(parser: argparse.ArgumentParser) -> None:
    """KV-transfer flags shared by `worker` and `serve`."""
    g = parser.add_argument_group("kv transfer (disaggregated prefill/decode)")
    config_flags.add_flags(g, TransferConfig)
    config_flags.add_flags(g, WorkerConfig, only=_WORKER_TRANSFER)


def transfer_argv(args: argparse.Namespace) -> list[str]:
    """Flags that reproduce the transfer options in `args` for a child worker (the
    secret travels in the child's environment, never on its command line)."""
    return [*config_flags.argv(TransferConfig, config_flags.values(TransferConfig, args)),
            *config_flags.argv(WorkerConfig, config_flags.values(WorkerConfig, args, _WORKER_TRANSFER),
                               _WORKER_TRANSFER)]


def worker_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> WorkerConfig:
    try:
        given = config_flags.values(TransferConfig, args)
        given["secret"] = secret_from_env(given["secret"])
        # Heartbeats stay well inside the shortest timeout they keep alive.
        given["heartbeat_interval"] = min(_TRANSFER_DEFAULTS.heartbeat_interval, given["lease"] / 3,
                                          given["stall_timeout"] / 3)
        worker = config_flags.values(WorkerConfig, args, WORKER_ONLY + _WORKER_TRANSFER)
        return WorkerConfig(host=args.host, transfer=TransferConfig(**given), **worker)
    except ConfigError as e:
        parser.error(str(e))


__all__ = ["add_engine_arguments", "add_transfer_args", "add_worker_args", "engine_argv",
           "engine_config_from_args", "transfer_argv", "worker_config_from_args"]
