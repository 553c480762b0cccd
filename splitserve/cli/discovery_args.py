"""Discovery flags shared by `worker`, `frontend` and `serve`: where workers are found
(--discovery, the forms parse_discovery accepts), the namespace they share, and how long
a dead worker stays listed."""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitserve.discovery import Discovery

DEFAULT_TTL_S = 10


def add_discovery_args(parser: argparse.ArgumentParser, role: str) -> None:
    """role: 'worker' (registers itself, so it also gets --worker-id) or any other part
    that only reads discovery."""
    group = parser.add_argument_group("discovery")
    group.add_argument("--discovery", metavar="URL", default=None,
                       help="where workers are registered: file:DIR, etcd://HOST:PORT or "
                            "static:URL[,URL...] (default: none, not registered)")
    group.add_argument("--namespace", default="default",
                       help="etcd key prefix shared by one deployment's frontends and workers "
                            "(default: %(default)s)")
    group.add_argument("--discovery-ttl", type=int, default=DEFAULT_TTL_S, metavar="SECONDS",
                       help="a worker that stops heartbeating (died) is dropped after this long "
                            "(default: %(default)s)")
    if role == "worker":
        group.add_argument("--worker-id", default=None,
                           help="this worker's name in discovery, unique in the namespace "
                                "(default: ROLE-HOSTNAME-PID)")


def discovery_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Discovery | None:
    """The backend --discovery names (None without it). Only validates: constructing a
    backend touches neither disk nor network, so a bad URL is reported before any work."""
    # Imported here: the etcd client is slow to import, and `splitserve --help` is not.
    from splitserve.discovery import DiscoveryError, parse_discovery

    if args.discovery_ttl <= 0:
        parser.error(f"--discovery-ttl must be positive, got {args.discovery_ttl}")
    if args.discovery is None:
        return None
    try:
        return parse_discovery(args.discovery, namespace=args.namespace, ttl_s=args.discovery_ttl)
    except DiscoveryError as e:
        parser.error(str(e))
