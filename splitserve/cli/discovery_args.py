"""Discovery flags shared by `worker`, `frontend`, `serve` and `doctor`, generated from
DiscoveryConfig: where workers are found (--discovery, the forms parse_discovery accepts),
the namespace they share, how long a dead worker stays listed, and how to reach etcd (TLS
files, user; the password only from the environment, like the deployment's secret)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from splitserve.cli import config_flags
from splitserve.config import ConfigError
from splitserve.discovery.config import DiscoveryConfig

# No etcd import here: the client is slow to import, and `splitserve --help` is not.
PASSWORD_ENV = "SPLITSERVE_ETCD_PASSWORD"

if TYPE_CHECKING:
    from splitserve.discovery import Discovery


def add_discovery_args(parser: argparse.ArgumentParser, role: str) -> None:
    """role: 'worker' (registers itself, so it also gets --worker-id) or any other part
    that only reads discovery."""
    group = parser.add_argument_group("discovery")
    config_flags.add_flags(group, DiscoveryConfig)
    if role == "worker":
        group.add_argument("--worker-id", default=None,
                           help="this worker's name in discovery, unique in the namespace "
                                "(default: ROLE-HOSTNAME-PID)")


def discovery_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DiscoveryConfig:
    try:
        config = DiscoveryConfig(**config_flags.values(DiscoveryConfig, args))
    except ConfigError as e:
        parser.error(str(e))
    if config.etcd_user is not None and not os.environ.get(PASSWORD_ENV):
        parser.error(f"--etcd-user {config.etcd_user} needs its password in ${PASSWORD_ENV}")
    return config


def discovery_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Discovery | None:
    """The backend --discovery names (None without it). Only validates: constructing a
    backend touches neither disk nor network, so a bad URL is reported before any work."""
    # Imported here: the etcd client is slow to import, and `splitserve --help` is not.
    from splitserve.discovery import DiscoveryError, parse_discovery
    from splitserve.discovery.etcd_client import EtcdAuth

    config = discovery_config(parser, args)
    if config.url is None:
        return None
    try:
        auth = EtcdAuth(cacert=config.etcd_cacert, cert=config.etcd_cert, key=config.etcd_key,
                        user=config.etcd_user,
                        password=os.environ.get(PASSWORD_ENV) if config.etcd_user else None)
        return parse_discovery(config.url, namespace=config.namespace, ttl_s=config.ttl_s,
                               etcd_auth=auth)
    except DiscoveryError as e:
        parser.error(str(e))


def discovery_argv(url: str, args: argparse.Namespace) -> list[str]:
    """The discovery flags in `args`, pointing at `url`, for child processes (the etcd
    password stays in the environment they inherit)."""
    given = {**config_flags.values(DiscoveryConfig, args), "url": url}
    return config_flags.argv(DiscoveryConfig, given)


__all__ = ["PASSWORD_ENV", "add_discovery_args", "discovery_argv",
           "discovery_config", "discovery_from_args"]
