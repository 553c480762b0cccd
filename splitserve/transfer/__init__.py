"""KV data plane between prefill (P) and decode (D) workers.

P: `KVTransferServer(kv, fingerprint, config, backend).start()` serves the KV port;
   the engine implements `PrefillBackend`.
D: `fetch_kv(addr, request, dest_blocks, kv, config, fingerprint) -> FetchResult`.
Wire format in `protocol`; transports (`tcp`, `shm`) behind `transport.Transport`.

Names are imported lazily: the CLI reads `transfer.config` for its flag defaults and
must not pay for torch while parsing arguments.
"""

import importlib

_EXPORTS = {
    "BlocksReady": "backend", "Done": "backend", "PrefillBackend": "backend",
    "PrefillRequest": "backend", "Progress": "backend",
    "fetch_kv": "client",
    "FetchResult": "config", "Outcome": "config", "TransferConfig": "config", "TransferStats": "config",
    "kv_fingerprint": "kvmem",
    "KVTransferServer": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'splitserve.transfer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"splitserve.transfer.{_EXPORTS[name]}"), name)
