"""`SplitserveConnector`: splitserve's verified, resumable KV hand-off as a vLLM KV connector.

vLLM makes one instance in the scheduler process (role SCHEDULER: scheduler.py) and one
in each worker process (role WORKER). A worker of a producer (kv_producer / kv_both)
serves its KV shard on kv_port + tp_rank from register_kv_caches on (producer.py); a
worker of a consumer pulls into its shard (consumer.py). Metadata flows scheduler ->
workers each step; completions flow back through get_finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from vllm.v1.metrics.cache_hit_source import CacheHitSource

from splitserve.transfer.config import TransferStats
from splitserve.transfer.kvmem import KVBlocks, kv_fingerprint
from splitserve.transfer.server import KVTransferServer
from splitserve.vllm_connector.affinity import unpinned
from splitserve.vllm_connector.config import ConnectorConfig
from splitserve.vllm_connector.consumer import Consumer
from splitserve.vllm_connector.metadata import SplitserveMetadata
from splitserve.vllm_connector.producer import Producer
from splitserve.vllm_connector.scheduler import SchedulerSide
from splitserve.vllm_connector.staging import HostStaging
from splitserve.vllm_connector.stats import SplitserveKVStats, SplitservePromMetrics

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class SplitserveConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P      # transferred from another vLLM instance

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config, role, kv_cache_config)
        _ensure_logging()
        tc = self._kv_transfer_config
        self.config = ConnectorConfig.from_extra(tc.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self._sched = SchedulerSide(self.block_size) if role == KVConnectorRole.SCHEDULER else None
        self._vllm_config = vllm_config
        self._producer: Producer | None = None
        self._server: KVTransferServer | None = None
        self._consumer: Consumer | None = None
        self._invalid: set[int] = set()
        self.stats = TransferStats()
        self._reported = SplitserveKVStats.zero()
        # Incidents since the last stats report: the KV server's threads and the model
        # runner's record them, get_kv_connector_stats hands them on.
        self._incidents: list[list[str]] = []
        self._incidents_lock = threading.Lock()
        self.stats.on_incident = self._on_incident

    # -- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        cfg, tc = self.config, self._kv_transfer_config
        tp_rank = get_tensor_model_parallel_rank()
        devices = {t.device.type for t in kv_caches.values()}
        num_blocks = self._kv_cache_config.num_blocks
        staging = None
        if cfg.host_staging or devices != {"cpu"}:
            # The transfer library moves bytes of host memory: KV elsewhere goes through
            # a host mirror (staging.py).
            staging = HostStaging(kv_caches, num_blocks)
        blocks = KVBlocks.from_layers(staging.mirror if staging else kv_caches, num_blocks,
                                      self.block_size)
        fp = kv_fingerprint(blocks, **_model_identity(self._vllm_config), tp_rank=tp_rank)
        if tc.is_kv_producer:
            self._producer = Producer(self.block_size, cfg.transfer.lease,
                                      cfg.transfer.heartbeat_interval, self.stats,
                                      stage=staging.to_host if staging else None)
            self._server = KVTransferServer(blocks, fp, cfg.transfer, self._producer,
                                            cfg.kv_host, cfg.kv_port + tp_rank, self.stats,
                                            partial_start=True)
            with unpinned():      # the acceptor's and reaper's threads, and all they start
                self._server.start()
        if tc.is_kv_consumer:
            self._consumer = Consumer(blocks, cfg.transfer, fp, self.stats, tp_rank,
                                      tc.kv_load_failure_policy,
                                      on_loaded=staging.to_device if staging else None)
        if cfg.state_dir:
            _write_rank_state(cfg.state_dir, tp_rank, fp, blocks.block_nbytes,
                              next(iter(kv_caches.values())).dtype)
        log.info("splitserve KV connector (%s) on TP rank %d: %d layers as %d planes, %d blocks "
                 "of %d tokens (%d bytes each)%s%s", tc.kv_role, tp_rank, len(kv_caches),
                 len(blocks.planes), blocks.num_blocks, self.block_size, blocks.block_nbytes,
                 f", staged through host memory (KV on {', '.join(sorted(devices))})"
                 if staging else "",
                 f", KV server on {cfg.kv_host}:{cfg.kv_port + tp_rank}" if self._server else "")

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, SplitserveMetadata)
        # Before this step's forward: blocks of an aborted or preempted prefill may be
        # overwritten by it, so their transfers end now.
        if self._producer is not None:
            for tid, why in connector_metadata.aborted.items():
                self._producer.on_aborted(tid, why)
                self._server.drop(tid, why)
        if self._consumer is not None:
            if connector_metadata.recvs:
                with unpinned():
                    for spec in connector_metadata.recvs:
                        self._consumer.start(spec)
            for rid, why in connector_metadata.cancels.items():
                self._consumer.cancel(rid, why)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Loads run on their own threads from bind_connector_metadata on."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Requests being loaded are not in the batch until their load finished."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs: Any) -> None:
        """Blocks are published whole, per step, in wait_for_save."""

    def wait_for_save(self) -> None:
        # NOTE: on CPU the forward is synchronous, so this step's KV is final here; on a
        # GPU the producer's staging copy is queued after it on the same stream.
        if self._producer is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, SplitserveMetadata)
        for step in meta.sends:
            self._producer.on_step(step)
        for rid, tid in meta.finished.items():
            self._producer.on_finished(rid, tid)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending = self._producer.finished_sending(finished_req_ids) if self._producer else set()
        recving: set[str] = set()
        if self._consumer is not None:
            recving, invalid = self._consumer.poll()
            self._invalid |= invalid
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def _on_incident(self, kind: str, request_id: str, reason: str, detail: str,
                     peer: str) -> None:
        with self._incidents_lock:
            self._incidents.append([kind, request_id, reason, detail, peer])

    def get_kv_connector_stats(self) -> SplitserveKVStats | None:
        with self._incidents_lock:
            incidents, self._incidents = self._incidents, []
        fetches = self._consumer.drain_reports() if self._consumer is not None else []
        now = SplitserveKVStats.of(self.stats, fetches, incidents)
        delta = now.minus(self._reported)
        self._reported = now
        return None if delta.is_empty() else delta

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> SplitserveKVStats:
        return SplitserveKVStats(data=data) if data is not None else SplitserveKVStats.zero()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return SplitservePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._consumer is not None:
            self._consumer.close()

    # -- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._sched is not None
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._sched is not None
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._sched is not None
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._sched is not None
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._sched is not None
        return self._sched.request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: "Request") -> tuple[int, ...]:
        # The request's own blocks arrive whole: every KV cache group is restored.
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))


def _ensure_logging() -> None:
    """vLLM configures only its own logger: without this, the transfer library's lines
    (fallbacks, lease expiries, resumes, each with its request id) would be lost in a
    plain `vllm serve`. Leaves any configuration the host process made alone."""
    ours = logging.getLogger("splitserve")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        f"(splitserve pid={os.getpid()}) %(levelname)s %(asctime)s [%(name)s] %(message)s",
        "%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def _write_rank_state(state_dir: str, tp_rank: int, fingerprint: dict[str, str],
                      block_nbytes: int, dtype: torch.dtype) -> None:
    """What this rank's KV is, for the worker's doctor probes (its API process has no KV):
    written whole, then renamed, so a reader never sees half of it."""
    path = os.path.join(state_dir, f"rank{tp_rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"fingerprint": fingerprint, "block_nbytes": block_nbytes,
                   "dtype": str(dtype).removeprefix("torch.")}, f)
    os.replace(path + ".tmp", path)


def _model_identity(vllm_config: "VllmConfig") -> dict[str, str]:
    """What the KV tensors cannot show: the model (its config, not its path, which differs
    between hosts), dtype, TP size. Block size and per-layer geometry come from KVBlocks."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    hf = {k: v for k, v in mc.hf_text_config.to_dict().items()
          if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
    digest = hashlib.sha256(json.dumps(hf, sort_keys=True, default=str).encode()).hexdigest()
    return {"engine": "vllm", "architecture": ",".join(mc.architectures or []),
            "model_config_sha256": digest[:16], "model_dtype": str(mc.dtype).removeprefix("torch."),
            "tp_size": str(pc.tensor_parallel_size)}
