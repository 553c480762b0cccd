"""Where a process finds (and a worker registers) the deployment's workers: the
`--discovery`, `--namespace`, `--discovery-ttl` and `--etcd-*` flags, as one validated
config (the CLI's flags are generated from it). The etcd password is never a field: it
comes only from the environment, like the deployment's secret."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.config import ConfigError, option
from splitserve.discovery.base import DEFAULT_TTL_S

ETCD_OPTIONS = ("etcd_cacert", "etcd_cert", "etcd_key", "etcd_user")


@dataclass(frozen=True)
class DiscoveryConfig:
    url: str | None = option(None, flag="--discovery", type=str, metavar="URL", help=(
        "where workers are registered: file:DIR, etcd://HOST:PORT or static:URL[,URL...] "
        "(default: none, not registered)"))
    namespace: str = option("default", help=(
        "etcd key prefix shared by one deployment's frontends and workers"))
    ttl_s: int = option(DEFAULT_TTL_S, flag="--discovery-ttl", metavar="SECONDS", help=(
        "a worker that stops heartbeating (died) is dropped after this long"))
    etcd_cacert: str | None = option(None, type=str, metavar="FILE", help=(
        "etcd over TLS: the CA bundle that signed etcd's certificate"))
    etcd_cert: str | None = option(None, type=str, metavar="FILE", help=(
        "etcd over TLS: this process's client certificate (with --etcd-key)"))
    etcd_key: str | None = option(None, type=str, metavar="FILE", help=(
        "etcd over TLS: the client certificate's private key"))
    etcd_user: str | None = option(None, type=str, metavar="NAME", help=(
        "etcd user; its password comes from $SPLITSERVE_ETCD_PASSWORD"))

    def __post_init__(self) -> None:
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, int) or self.ttl_s <= 0:
            raise ConfigError(f"--discovery-ttl must be positive, got {self.ttl_s}")
        given = [f"--{f.replace('_', '-')}" for f in ETCD_OPTIONS if getattr(self, f) is not None]
        if given and not (self.url or "").startswith("etcd:"):
            raise ConfigError(f"{', '.join(given)} apply to etcd discovery "
                              "(--discovery etcd://HOST:PORT)")
