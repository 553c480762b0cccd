"""Handshake helpers shared by both sides: auth proofs, host identity, socket tuning."""

from __future__ import annotations

import hashlib
import hmac
import socket
from pathlib import Path

from splitserve.transfer.config import TransferConfig


def proof(secret: str | None, role: bytes, first: bytes, second: bytes) -> bytes:
    """HMAC-SHA256 over (role | nonces); the secret itself never crosses the wire.

    `role` differs for P and D so one side's proof can never be reflected back as the
    other's.
    """
    if secret is None:
        return b""
    return hmac.new(secret.encode(), role + first + second, hashlib.sha256).digest()


def proof_ok(secret: str | None, got: bytes, role: bytes, first: bytes, second: bytes) -> bool:
    return secret is None or hmac.compare_digest(got, proof(secret, role, first, second))


def host_id() -> str:
    """Same value only for processes that can share /dev/shm (same kernel and hostname).

    boot_id is per kernel boot; the hostname separates containers/pods on one node, which
    usually do not share /dev/shm.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{boot}:{socket.gethostname()}"


def tune_socket(sock: socket.socket, config: TransferConfig) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Kernel keepalive catches a peer host that vanished without RST even when neither
    # side is sending (e.g. P waiting on a long chunk); progress timeouts do the rest.
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.socket_buffer)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.socket_buffer)
