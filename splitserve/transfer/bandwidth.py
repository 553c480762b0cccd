"""P→D bandwidth measured through the real KV protocol with synthetic blocks, for
`splitserve doctor`: how long the KV of the longest allowed prompt takes on this link.

The prefill worker opens a short-lived KV server (ProbeServer) on its KV listen address
with a scratch pool shaped like its real KV blocks and a synthetic prefill whose blocks
are all ready at once (as `bench transfer` does); the decode worker fetches `nbytes` of
it into its own scratch pool (measure). Handshake, frames, checksums, ACKs and the
transport choice are the production code's; the model's real KV is never touched, and
no engine block is reserved on either side. The probe server's port is not the KV
port: a firewall that opens only the KV port blocks the probe (doctor says so).
"""

from __future__ import annotations

import threading
import time

import torch

from splitserve.sampling_params import SamplingParams
from splitserve.transfer.backend import PrefillRequest
from splitserve.transfer.client import fetch_kv
from splitserve.transfer.config import TransferConfig
from splitserve.transfer.kvmem import KVBlocks, kv_fingerprint
from splitserve.transfer.server import KVTransferServer
from splitserve.transfer.synthetic import SyntheticBackend

POOL_BYTES = 32 << 20      # scratch blocks cycled through: the link is measured, not RAM
MAX_PROBE_BYTES = 1 << 30  # one probe moves at most this much
PROBE_TTL_S = 120.0        # a probe server left open closes itself


def scratch_kv(block_shape: list[int], dtype: str) -> torch.Tensor:
    """A pool of blocks shaped like the real KV's (same per-block layout and dtype, so
    the fingerprints of two such pools agree exactly when the real ones would)."""
    dt = getattr(torch, dtype)
    block_nbytes = torch.Size(block_shape).numel() * torch.empty((), dtype=dt).element_size()
    blocks = max(1, POOL_BYTES // block_nbytes)
    return torch.zeros((blocks, *block_shape), dtype=dt)


class ProbeServer:
    """P side: a KV server over a scratch pool, closed by close() or after PROBE_TTL_S."""

    def __init__(self, block_shape: list[int], dtype: str, config: TransferConfig, host: str):
        kv = scratch_kv(block_shape, dtype)
        # Random bytes: nothing compresses or short-cuts along the way.
        flat = kv.view(kv.shape[0], -1).view(torch.uint8)
        flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(0)))
        pool = kv.shape[0]
        backend = SyntheticBackend(kv, blocks_per_chunk=1 << 30, block_map=lambda i: i % pool)
        self.server = KVTransferServer(kv, kv_fingerprint(kv), config, backend, host=host, port=0)
        _, self.port = self.server.start()
        self._timer = threading.Timer(PROBE_TTL_S, self.close)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        self._timer.cancel()
        self.server.close()


def measure(addr: tuple[str, int], block_shape: list[int], dtype: str, config: TransferConfig,
            nbytes: int, probe_id: str) -> dict:
    """D side: fetch about `nbytes` from a ProbeServer at `addr`; the outcome and the rate."""
    kv = scratch_kv(block_shape, dtype)
    pool = kv.shape[0]
    block_nbytes = kv[0].numel() * kv.element_size()
    nblocks = max(1, min(nbytes, MAX_PROBE_BYTES) // block_nbytes)
    tokens = nblocks * KVBlocks(kv).block_size
    request = PrefillRequest(probe_id, [0] * tokens, SamplingParams(), nblocks)
    t0 = time.monotonic()
    r = fetch_kv(addr, request, [i % pool for i in range(nblocks)], kv, config,
                 kv_fingerprint(kv))
    seconds = time.monotonic() - t0
    return {"outcome": r.outcome.value, "reason": r.reason, "transport": r.transport,
            "bytes": r.bytes, "seconds": seconds,
            "bytes_per_s": r.bytes / seconds if r.ok and seconds > 0 else 0.0}

