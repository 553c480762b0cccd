"""How a vLLM prefill or decode worker configures SplitserveConnector inside its AsyncLLM.

The worker's own flags say everything the connector needs: the role (prefill: vLLM's
kv_producer, whose KV server listens on --kv-port, TP rank r on kv_port + r; decode:
kv_consumer), the transfer settings (--kv-stall-timeout, --kv-lease, --kv-transport, ...)
and --kv-fallback, which is vLLM's kv_load_failure_policy under another name (local ->
recompute: only the blocks that did not arrive verified are computed; fail -> the request
ends with an error). The secret never goes into the config (vLLM logs its config): the
connector reads it from $SPLITSERVE_KV_SECRET, which the engine sets for its processes.
Nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from splitserve.config import ConfigError
from splitserve.transfer.config import SCALAR_FIELDS, TransferConfig, TransferStats

# vLLM's kv_load_failure_policy for each --kv-fallback.
FAILURE_POLICY = {"local": "recompute", "fail": "fail"}
_KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}
# Transfers whose token counts wait for their request's final output: a request that
# never reads its own (its stream dropped) is forgotten after this many newer ones.
_TOKENS_KEPT = 4096


@dataclass(frozen=True)
class ConnectorSettings:
    """role: prefill or decode. kv_host: where a prefill worker's KV server binds (the
    worker's --host); kv_port: its first port (TP rank r on kv_port + r), chosen before
    vLLM starts (pick_kv_ports) since vLLM's processes bind it. Unused by a decode worker."""

    role: str
    kv_fallback: str = "local"
    kv_host: str = "127.0.0.1"
    kv_port: int | None = None
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def __post_init__(self) -> None:
        if self.role not in _KV_ROLE:
            raise ConfigError(f"a KV connector role is prefill or decode, got {self.role!r}")
        if self.kv_fallback not in FAILURE_POLICY:
            raise ConfigError(f"kv_fallback must be one of {tuple(FAILURE_POLICY)}, got "
                              f"{self.kv_fallback!r}")
        if self.role == "prefill" and not (self.kv_port and 0 < self.kv_port < 65536):
            raise ConfigError(f"a vLLM prefill worker needs a KV port in 1..65535, got "
                              f"{self.kv_port!r}")

    def kv_transfer_config(self, state_dir: str = "") -> dict[str, Any]:
        """vLLM's KVTransferConfig fields for this worker; state_dir: where the connector's
        ranks say what their KV is (read_rank_states)."""
        extra = {k: v for k, v in dataclasses.asdict(self.transfer).items() if k != "secret"}
        if state_dir:
            extra["state_dir"] = state_dir
        if self.role == "prefill":
            extra.update(kv_port=self.kv_port, kv_host=self.kv_host)
        return {"kv_connector": "SplitserveConnector",
                "kv_connector_module_path": "splitserve.vllm_connector",
                "kv_role": _KV_ROLE[self.role],
                "kv_load_failure_policy": FAILURE_POLICY[self.kv_fallback],
                "kv_connector_extra_config": extra}


def pick_kv_ports(host: str, count: int, first: int = 0) -> int:
    """The first of `count` consecutive ports free on host (first if given: it is the
    user's --kv-port, used as is). vLLM's worker processes bind them later, so another
    process could take one meanwhile: the KV server then fails to start and the worker
    exits, which a supervisor (serve) answers by restarting it on new ports."""
    if first:
        return first
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + count <= 65536 and all(_free(host, base + i) for i in range(1, count)):
            return base
    raise ConfigError(f"found no {count} consecutive free ports on {host} for the KV server")


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class ConnectorReports:
    """What a vLLM worker's connector reports (summed over TP ranks, what changed since
    its last report: vllm_connector/stats.py SplitserveKVStats.data), applied where our
    own engine's transfers land: counters in the worker's TransferStats (its /metrics),
    incidents in its IncidentLog (stats.on_incident: /incidents, doctor), each load's
    duration in splitserve_kv_transfer_seconds, and each transfer's arrived prompt tokens
    kept for the request's final output (`transferred_tokens`).

    Runs on the event loop only, the one thread that reads or writes a vLLM worker's
    TransferStats (vLLM's stat loggers and the /metrics handler both run there), so the
    labelled counters are updated without TransferStats' lock. vLLM reports a load's
    stats in the step it ends, before the step that schedules its request: a request's
    final output always comes after its transfer's report."""

    def __init__(self, stats: TransferStats, observe_seconds: Callable[[float], None]):
        self.stats = stats
        self._observe_seconds = observe_seconds
        self._tokens: OrderedDict[str, int] = OrderedDict()    # transfer id -> tokens

    def add(self, data: dict[str, Any]) -> None:
        stats = self.stats
        for outcome, n in data.get("transfers", {}).items():
            stats.transfers[outcome] += n
        for reason, n in data.get("fallbacks", {}).items():
            stats.fallbacks[reason] += n
        for name in SCALAR_FIELDS:
            if data.get(name):
                stats.add(name, data[name])
        for incident in data.get("incidents", []):
            stats.incident(*incident)
        for fetch in data.get("fetches", []):
            self._observe_seconds(fetch["seconds"])
            # Each TP rank moves its own shard of every token: the request has the
            # tokens every rank has.
            tid = fetch["transfer_id"]
            self._tokens[tid] = min(fetch["tokens"], self._tokens.get(tid, fetch["tokens"]))
            self._tokens.move_to_end(tid)
        while len(self._tokens) > _TOKENS_KEPT:
            self._tokens.popitem(last=False)

    def fallback(self, reason: str, request_id: str, detail: str, peer: str) -> None:
        """A fallback the worker decided itself (its prefill worker refused the prompt),
        counted and recorded as the connector's are."""
        self.stats.fallbacks[reason] += 1
        self.stats.incident("fallback", request_id, reason, detail, peer)

    def transferred_tokens(self, transfer_id: str) -> int:
        """The prompt tokens whose KV arrived for transfer_id (0 if no load reported);
        forgotten once read."""
        return self._tokens.pop(transfer_id, 0)


def read_rank_states(state_dir: str) -> list[dict[str, Any]]:
    """What each TP rank's connector wrote when vLLM registered its KV, {"fingerprint",
    "block_nbytes", "dtype"}: rank 0 first, up to the first rank that has written none."""
    out: list[dict[str, Any]] = []
    while True:
        try:
            with open(os.path.join(state_dir, f"rank{len(out)}.json")) as f:
                out.append(json.load(f))
        except FileNotFoundError:
            return out
