"""A KV session handshake and nothing more: what `splitserve doctor` asks a decode worker
to try against each prefill worker, from where the KV traffic really flows.

It runs the decode side's real handshake (client._Fetch.hello: both proofs of the
shared secret, then the fingerprints) and closes before PREFILL, so the prefill worker
computes nothing and pins nothing (it logs the session's end at INFO).
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass

import torch

from splitserve.transfer import protocol as proto
from splitserve.sampling_params import SamplingParams
from splitserve.transfer.backend import PrefillRequest
from splitserve.transfer.client import FetchCancel, _Fatal, _Fetch
from splitserve.transfer.config import Outcome, TransferConfig
from splitserve.transfer.handshake import tune_socket

UNREACHABLE = "unreachable"     # no TCP connection (refused, timed out, no route)


@dataclass(frozen=True)
class SessionProbe:
    outcome: str            # "ok", UNREACHABLE, or a fetch Outcome value (auth_failed, mismatch…)
    reason: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome == Outcome.OK.value

    def to_json(self) -> dict:
        return asdict(self)


def probe_session(addr: tuple[str, int], kv: torch.Tensor, config: TransferConfig,
                  fingerprint: dict[str, str]) -> SessionProbe:
    t0 = time.monotonic()
    # One placeholder block: hello() never sends the request, so none is reserved.
    fetch = _Fetch(addr, PrefillRequest("doctor-session-probe", [0], SamplingParams(), 1),
                   [0], kv, config, fingerprint, FetchCancel())
    try:
        sock = socket.create_connection(addr, timeout=config.connect_timeout)
    except OSError as e:
        return SessionProbe(UNREACHABLE, f"cannot connect to {addr[0]}:{addr[1]}: {e}",
                            time.monotonic() - t0)
    try:
        tune_socket(sock, config)
        sock.settimeout(config.handshake_timeout)
        _, offers = fetch.hello(proto.Channel(sock, config.max_header_bytes))
        return SessionProbe(Outcome.OK.value, f"handshake done (secret and fingerprint agree; "
                            f"transports offered {offers})", time.monotonic() - t0)
    except _Fatal as e:
        return SessionProbe(e.outcome.value, e.reason, time.monotonic() - t0)
    except proto.ProtocolError as e:
        return SessionProbe(Outcome.PROTOCOL_ERROR.value, str(e), time.monotonic() - t0)
    except OSError as e:
        return SessionProbe(UNREACHABLE, f"{addr[0]}:{addr[1]} closed the handshake: {e!r}",
                            time.monotonic() - t0)
    finally:
        sock.close()
