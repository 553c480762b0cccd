"""A worker's role and KV-transfer settings (engine settings are EngineConfig).

The address a worker advertises is checked here, at start-up: a worker that listens on
every interface but would tell its peers a loopback address is unreachable from any
other host, which in a cluster means every KV transfer fails. Refuse that loudly.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

from splitserve.config import ConfigError, option
from splitserve.transfer.config import TransferConfig
from splitserve.worker.protocol import FALLBACKS, ROLES

SECRET_ENV = "SPLITSERVE_KV_SECRET"
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class WorkerConfig:
    role: str = option("both", choices=ROLES, help="what this worker does")
    host: str = "127.0.0.1"
    advertise_host: str | None = option(None, type=str, help=(
        "address peers use to reach this worker (default: --host)"))
    kv_port: int = option(0, help="prefill role: the port KV is served on; 0 picks a free one")
    kv_fallback: str = option("local", flag="--kv-fallback", choices=FALLBACKS, help=(
        "on an unrecoverable transfer: compute the rest locally, reusing verified blocks, "
        "or fail the request"))
    transfer: TransferConfig = field(default_factory=TransferConfig)
    # decode role: KV fetches on their own bounded pool, so fetches waiting on a busy
    # prefill worker can never starve the event loop's executor (discovery keep-alive).
    kv_fetch_threads: int = option(8, help=(
        "decode: KV fetches running at once; more wait their turn in order"))
    # decode role without discovery: the prefill KV ports it may connect to, as "HOST"
    # (any port) or "HOST:PORT". With discovery, only registered prefill workers.
    kv_peers: tuple[str, ...] = option((), help=(
        "decode: comma-separated HOST or HOST:PORT of prefill KV ports this worker may fetch "
        "from, for setups without --discovery (with discovery it fetches only from prefill "
        "workers registered there)"))

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.kv_fallback not in FALLBACKS:
            raise ConfigError(f"kv_fallback must be one of {FALLBACKS}, got {self.kv_fallback!r}")
        if not 0 <= self.kv_port <= 65535:
            raise ConfigError(f"kv_port must be 0..65535, got {self.kv_port}")
        if not 1 <= self.kv_fetch_threads <= 1024:
            raise ConfigError(f"kv_fetch_threads must be 1..1024, got {self.kv_fetch_threads}")
        for peer in self.kv_peers:
            host, sep, port = peer.rpartition(":") if peer.count(":") == 1 else ("", "", peer)
            if sep and not (host and port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(f"kv_peers entry {peer!r}: expected HOST or HOST:PORT")
        self.advertised_host()   # raises when the advertised address cannot work

    def advertised_host(self) -> str:
        """The host peers use to reach this worker's API and KV port."""
        if self.advertise_host:
            addr = self.advertise_host
        elif self.host in _WILDCARDS:
            addr = socket.gethostname()
        else:
            return self.host
        if self.host in _WILDCARDS and _is_loopback(addr):
            how = "--advertise-host" if self.advertise_host else "this machine's name"
            raise ConfigError(
                f"listening on all interfaces ({self.host or '*'}) but advertising {addr!r} "
                f"({how}), which resolves to a loopback address: workers on other hosts could "
                f"not reach this one and every KV transfer to them would fail. Pass "
                f"--advertise-host with an address other hosts can reach, or listen on "
                f"127.0.0.1 for a single-machine setup.")
        return addr


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return any(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def secret_from_env(value: str | None) -> str | None:
    return value if value is not None else (os.environ.get(SECRET_ENV) or None)
