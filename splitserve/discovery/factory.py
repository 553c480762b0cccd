"""`--discovery URL` → a Discovery backend.

    file:DIR            embedded: a directory of worker records (one machine, no server)
    etcd://HOST[:PORT]  etcd with leases (many machines); PORT defaults to 2379
    static:URL[,URL]    a fixed list of worker API URLs, each optionally ROLE=URL

Constructing a backend touches neither disk nor network, so a CLI can validate the URL
at start-up and report a mistake before anything runs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from splitserve.discovery.base import Discovery, DiscoveryError
from splitserve.discovery.etcd_client import EtcdAuth
from splitserve.discovery.etcd_store import EtcdDiscovery, EtcdDiscoveryConfig
from splitserve.discovery.file_store import FileDiscovery, FileDiscoveryConfig
from splitserve.discovery.static import StaticDiscovery, StaticDiscoveryConfig

DISCOVERY_FORMS = "file:DIR, etcd://HOST:PORT or static:URL[,URL...]"


def parse_discovery(url: str, *, namespace: str = "default", ttl_s: int | None = None,
                    etcd_auth: EtcdAuth | None = None) -> Discovery:
    """namespace applies to etcd (the key prefix); ttl_s (None: the backend's default)
    applies to file and etcd — how long a dead worker stays listed; etcd_auth: how to
    reach etcd (TLS, user/password; None: plaintext, no authentication)."""
    scheme, sep, rest = url.partition(":")
    if not sep:
        raise DiscoveryError(f"discovery URL {url!r} has no scheme; expected {DISCOVERY_FORMS}")
    ttl = {} if ttl_s is None else {"ttl_s": ttl_s}
    if scheme == "file":
        if not rest or rest.startswith("//"):
            raise DiscoveryError(f"discovery URL {url!r}: expected file:DIR (a directory path, "
                                 "e.g. file:/tmp/splitserve-workers)")
        return FileDiscovery(FileDiscoveryConfig(directory=rest, **ttl))
    if scheme == "etcd":
        return EtcdDiscovery(_etcd_config(url, namespace, ttl, etcd_auth or EtcdAuth()))
    if scheme == "static":
        entries = tuple(e.strip() for e in rest.split(",") if e.strip())
        return StaticDiscovery(StaticDiscoveryConfig(entries=entries))
    raise DiscoveryError(f"unknown discovery scheme {scheme!r} in {url!r}; expected {DISCOVERY_FORMS}")


def _etcd_config(url: str, namespace: str, ttl: dict, auth: EtcdAuth) -> EtcdDiscoveryConfig:
    parts = urlsplit(url)
    try:
        port = parts.port or 2379
    except ValueError as e:
        raise DiscoveryError(f"discovery URL {url!r}: {e}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise DiscoveryError(f"discovery URL {url!r}: expected etcd://HOST:PORT")
    return EtcdDiscoveryConfig(host=parts.hostname, port=port, namespace=namespace, auth=auth, **ttl)
