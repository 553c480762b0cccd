"""The connector's settings, read from vLLM's `kv_connector_extra_config`.

    --kv-transfer-config '{"kv_connector": "SplitserveConnector",
        "kv_connector_module_path": "splitserve.vllm_connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"kv_port": 7600, "lease": 30, "transport": "tcp"}}'

`kv_port` / `kv_host`: where the prefill side's KV server listens (tensor-parallel rank r
on kv_port + r, so P rank r serves D rank r); `host_staging`: move KV through a host
mirror even when it is in CPU memory (always so for KV on a GPU: staging.py); `state_dir`:
where each rank writes what its KV is (rank{r}.json: the fingerprint, the bytes of a
block, the dtype) for a splitserve worker's doctor probes; every other key is a field of
the transfer library's `TransferConfig` (stall_timeout, busy_timeout, lease, transport,
secret, ...).
The secret defaults to $SPLITSERVE_KV_SECRET so it never has to sit on a command line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from splitserve.config import ConfigError
from splitserve.transfer.config import TransferConfig

SECRET_ENV = "SPLITSERVE_KV_SECRET"
DEFAULT_KV_PORT = 7600
_TRANSFER_FIELDS = {f.name for f in dataclasses.fields(TransferConfig)}


@dataclass(frozen=True)
class ConnectorConfig:
    kv_port: int = DEFAULT_KV_PORT     # P: rank r listens on kv_port + r
    kv_host: str = "127.0.0.1"         # P: bind address (0.0.0.0 for peers on other hosts)
    host_staging: bool = False         # CPU KV through the host mirror too (GPU KV always)
    state_dir: str = ""                # each rank's rank{r}.json (none when empty)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def __post_init__(self) -> None:
        if not 0 < self.kv_port < 65536:
            raise ConfigError(f"kv_port must be in 1..65535, got {self.kv_port}")
        if not self.kv_host:
            raise ConfigError("kv_host must not be empty")

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> "ConnectorConfig":
        unknown = set(extra) - _TRANSFER_FIELDS - {"kv_port", "kv_host", "host_staging",
                                                   "state_dir"}
        if unknown:
            raise ConfigError(f"SplitserveConnector: unknown kv_connector_extra_config keys "
                              f"{sorted(unknown)}; known: kv_port, kv_host, host_staging, "
                              f"state_dir, "
                              f"{', '.join(sorted(_TRANSFER_FIELDS))}")
        staging = extra.get("host_staging", False)
        if not isinstance(staging, bool):
            raise ConfigError(f"SplitserveConnector: host_staging must be true or false, got "
                              f"{staging!r}")
        transfer = {k: v for k, v in extra.items() if k in _TRANSFER_FIELDS}
        transfer.setdefault("secret", os.environ.get(SECRET_ENV) or None)
        return cls(kv_port=int(extra.get("kv_port", DEFAULT_KV_PORT)),
                   kv_host=str(extra.get("kv_host", "127.0.0.1")), host_staging=staging,
                   state_dir=str(extra.get("state_dir", "")),
                   transfer=TransferConfig(**transfer))
