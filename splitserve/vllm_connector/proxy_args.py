"""`splitserve vllm-proxy` flags and their validated config (no HTTP imports: the CLI
parser loads this module for `--help`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from urllib.parse import urlsplit

from splitserve.config import ConfigError
from splitserve.vllm_connector.config import DEFAULT_KV_PORT


@dataclass(frozen=True)
class ProxyConfig:
    prefill: str                 # P's OpenAI base URL, e.g. http://10.0.0.1:8100
    decode: str                  # D's OpenAI base URL
    prefill_kv_host: str         # where D's workers reach P's KV server (rank 0)
    prefill_kv_port: int = DEFAULT_KV_PORT
    timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            url = urlsplit(getattr(self, name))
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"--{name} must be an http(s) URL, got {getattr(self, name)!r}")
        if not 0 < self.prefill_kv_port < 65536:
            raise ConfigError(f"prefill KV port must be in 1..65535, got {self.prefill_kv_port}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {self.timeout}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", required=True, help="prefill vllm serve URL, e.g. http://127.0.0.1:8100")
    p.add_argument("--decode", required=True, help="decode vllm serve URL")
    p.add_argument("--prefill-kv", metavar="HOST:PORT",
                   help="prefill's KV server as the decode workers reach it (its "
                        "kv_connector_extra_config kv_port; default: the --prefill host, "
                        f"port {DEFAULT_KV_PORT})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default: %(default)s)")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--timeout", type=float, default=ProxyConfig.timeout,
                   help="seconds per upstream request (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    host, port = urlsplit(args.prefill).hostname or "", DEFAULT_KV_PORT
    if args.prefill_kv:
        h, _, p = args.prefill_kv.rpartition(":")
        if not h or not p.isdigit():
            raise ConfigError(f"--prefill-kv must be HOST:PORT, got {args.prefill_kv!r}")
        host, port = h, int(p)
    return ProxyConfig(args.prefill, args.decode, host, port, args.timeout)
