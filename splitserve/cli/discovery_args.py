"""Discovery flags shared by `worker`, `frontend` and `serve`: where workers are found
(--discovery, the forms parse_discovery accepts), the namespace they share, how long
a dead worker stays listed, and how to reach etcd (TLS files, user; the password only
from the environment, like the deployment's secret)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

# No etcd import here: the client is slow to import, and `splitserve --help` is not.
PASSWORD_ENV = "SPLITSERVE_ETCD_PASSWORD"
_ETCD_FLAGS = ("etcd_cacert", "etcd_cert", "etcd_key", "etcd_user")

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
    group.add_argument("--etcd-cacert", metavar="FILE", default=None,
                       help="etcd over TLS: the CA bundle that signed etcd's certificate")
    group.add_argument("--etcd-cert", metavar="FILE", default=None,
                       help="etcd over TLS: this process's client certificate (with --etcd-key)")
    group.add_argument("--etcd-key", metavar="FILE", default=None,
                       help="etcd over TLS: the client certificate's private key")
    group.add_argument("--etcd-user", metavar="NAME", default=None,
                       help=f"etcd user; its password comes from ${PASSWORD_ENV}")
    if role == "worker":
        group.add_argument("--worker-id", default=None,
                           help="this worker's name in discovery, unique in the namespace "
                                "(default: ROLE-HOSTNAME-PID)")


def discovery_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Discovery | None:
    """The backend --discovery names (None without it). Only validates: constructing a
    backend touches neither disk nor network, so a bad URL is reported before any work."""
    # Imported here: the etcd client is slow to import, and `splitserve --help` is not.
    from splitserve.discovery import DiscoveryError, parse_discovery
    from splitserve.discovery.etcd_client import EtcdAuth

    if args.discovery_ttl <= 0:
        parser.error(f"--discovery-ttl must be positive, got {args.discovery_ttl}")
    given = [f"--{f.replace('_', '-')}" for f in _ETCD_FLAGS if getattr(args, f) is not None]
    if given and not (args.discovery or "").startswith("etcd:"):
        parser.error(f"{', '.join(given)} apply to etcd discovery (--discovery etcd://HOST:PORT)")
    if args.discovery is None:
        return None
    if args.etcd_user is not None and not os.environ.get(PASSWORD_ENV):
        parser.error(f"--etcd-user {args.etcd_user} needs its password in ${PASSWORD_ENV}")
    try:
        auth = EtcdAuth(cacert=args.etcd_cacert, cert=args.etcd_cert, key=args.etcd_key,
                        user=args.etcd_user,
                        password=os.environ.get(PASSWORD_ENV) if args.etcd_user else None)
        return parse_discovery(args.discovery, namespace=args.namespace, ttl_s=args.discovery_ttl,
                               etcd_auth=auth)
    except DiscoveryError as e:
        parser.error(str(e))


def etcd_argv(args: argparse.Namespace) -> list[str]:
    """The etcd flags in `args`, for child processes (the password stays in the
    environment they inherit)."""
    return [a for f in _ETCD_FLAGS if getattr(args, f) is not None
            for a in (f"--{f.replace('_', '-')}", getattr(args, f))]
