"""KV in accelerator memory (CUDA) moves through a host mirror: one CPU tensor per KV
layer, shaped like it (pinned when the layer is on CUDA, so the copies are DMA). The
transfer library only ever reads and writes the mirror (KVBlocks wraps it), never the
device tensors.

- P: after each step's forward, the blocks holding that step's tokens are copied device
  -> host, and the copy has finished, before the producer publishes them to the KV server
  (Producer's `stage` hook). The copy is queued on the stream that ran the forward, so it
  reads the step's finished KV.
- D: a load writes into the mirror; the blocks that arrived verified are copied host ->
  device, and the copy has finished, before vLLM is told the load ended (Consumer's
  `on_loaded` hook), so the next forward reads them.

The mirror is as large as the KV cache. On CPU, where the KV already is in host memory,
the connector uses the layers themselves unless `host_staging` is set: then this same path
runs (CPU to CPU), which is how it is tested where no GPU is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class HostStaging:
    def __init__(self, layers: Mapping[str, torch.Tensor], num_blocks: int):
        """layers: vLLM's KV tensors by layer name (several names may share one tensor:
        KV sharing; the mirror shares likewise)."""
        self.device_layers: dict[str, torch.Tensor] = {}
        self.mirror: dict[str, torch.Tensor] = {}
        self._block_dim: dict[str, int] = {}
        by_ptr: dict[int, torch.Tensor] = {}
        for name, t in layers.items():
            if num_blocks not in t.shape:
                raise ValueError(f"KV layer {name}: shape {tuple(t.shape)} has no block dim of "
                                 f"size {num_blocks}")
            host = by_ptr.get(t.data_ptr())
            if host is None:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                   pin_memory=t.device.type == "cuda")
                by_ptr[t.data_ptr()] = host
                self.device_layers[name] = t
                self._block_dim[name] = list(t.shape).index(num_blocks)
            self.mirror[name] = host
        self._devices = {t.device for t in self.device_layers.values()}

    def to_host(self, block_ids: Sequence[int]) -> None:
        """Device -> mirror, for these physical blocks; returns once the copy is done."""
        self._copy(block_ids, to_host=True)

    def to_device(self, block_ids: Sequence[int]) -> None:
        """Mirror -> device, for these physical blocks; returns once the copy is done."""
        self._copy(block_ids, to_host=False)

    def _copy(self, block_ids: Sequence[int], to_host: bool) -> None:
        if not block_ids:
            return
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        for name, dev in self.device_layers.items():
            host, d = self.mirror[name], self._block_dim[name]
            if to_host:
                host.index_copy_(d, ids, dev.index_select(d, ids.to(dev.device)).to("cpu"))
            else:
                dev_ids = ids.to(dev.device)
                dev.index_copy_(d, dev_ids, host.index_select(d, ids).to(dev.device,
                                                                         non_blocking=True))
        for device in self._devices:
            if device.type != "cpu":
                torch.accelerator.synchronize(device)
