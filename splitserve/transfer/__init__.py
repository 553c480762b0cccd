"""KV data plane between prefill (P) and decode (D) workers.

P: `KVTransferServer(kv, fingerprint, config, backend).start()` serves the KV port;
   the engine implements `PrefillBackend`.
D: `fetch_kv(addr, request, dest_blocks, kv, config, fingerprint) -> FetchResult`.
Wire format in `protocol`; transports (`tcp`, `shm`) behind `transport.Transport`.
"""

from splitserve.transfer.backend import (BlocksReady, Done, PrefillBackend, PrefillRequest,
                                         Progress)
from splitserve.transfer.client import fetch_kv
from splitserve.transfer.config import FetchResult, Outcome, TransferConfig, TransferStats
from splitserve.transfer.kvmem import kv_fingerprint
from splitserve.transfer.server import KVTransferServer

__all__ = ["BlocksReady", "Done", "FetchResult", "KVTransferServer", "Outcome",
           "PrefillBackend", "PrefillRequest", "Progress", "TransferConfig", "TransferStats",
           "fetch_kv", "kv_fingerprint"]
