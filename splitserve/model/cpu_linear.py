"""Linear layers as prepacked oneDNN matmuls on CPU.

`F.linear` streams the checkpoint's [out, in] weight through MKL (float32) or re-lays it
out on every call (bfloat16). The same weights reordered once into oneDNN's blocked
format (as vLLM's CPU build does) measured, on SmolLM2-135M with 2 threads:
- bfloat16: the AMX kernels directly, 1.3-2.4x faster for 1-512 rows: packed by default;
- float32 on an Intel Xeon (AVX-512): single matmuls of 16-32 rows 1.3-1.5x faster, but
  one row pays oneDNN's per-call overhead; engine runs of 64 requests at 16 concurrent
  were even within noise and a lone sequence 12-18% slower: F.linear there;
- float32 on an AMD EPYC (AVX2): MKL's sgemm does not take its fast paths on a CPU that
  is not Intel's (16 rows x gate_up 4.0-5.5 ms against oneDNN's 1.7-2.1); 16 concurrent
  requests 1.2x faster packed, a lone sequence 12% faster: packed on every CPU but Intel's.

A packed weight is an opaque oneDNN tensor: it can only be multiplied, never read or
copied into, so packing happens once, after every weight is loaded.

oneDNN builds one primitive per (row count, weight shape) and keeps it in two caches (its
own and PyTorch's ideep LRU), 1,024 entries each by default; an entry holds buffers
that grow with the row count. Prefill steps bring a new row count nearly every step, so
a worker's memory grew by hundreds of MiB over a few hundred requests (measured on the
AMD EPYC: +870 MiB after 600 row counts on SmolLM2's five linear shapes; the soak test's
prefill worker +156 MiB in 150 s). Both caches are bounded before the first primitive
exists: an evicted shape costs ~1 ms to rebuild, once per step (every layer with that
shape then reuses it), against 60+ ms for a decode step.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Entries per cache: SmolLM2 has five linear shapes, so ~6 recent row counts (decode
# batches keep theirs between prefill steps).
PRIMITIVE_CACHE_CAPACITY = 32


def should_pack(choice: str, dtype: torch.dtype, device: torch.device) -> bool:
    """choice is EngineConfig.cpu_linear: auto (bfloat16; float32 unless the CPU is
    Intel's), onednn (wherever supported) or torch (never)."""
    if choice == "torch" or not packing_supported(dtype, device):
        return False
    return choice == "onednn" or dtype == torch.bfloat16 or cpu_vendor() != "GenuineIntel"


@cache
def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...); "" if unknown."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: unknown vendor, so auto packs (oneDNN is fast everywhere)
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("vendor_id")), "")


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16
                                      and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bound_primitive_caches() -> None:
    """Caps oneDNN's and ideep's primitive caches unless the user set them. Both read
    their capacity once, when the process creates its first oneDNN primitive (a weight
    reorder counts), so every PackedLinear calls it before reordering its weight."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(PRIMITIVE_CACHE_CAPACITY))


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W reordered for oneDNN. Inputs are [rows, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        bound_primitive_caches()      # before this reorder, the process's first primitive
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # No batch-size hint: one packed layout serves every row count (a hint tuned for
        # one size made others up to 8x slower).
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach()),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def pack_linears(model: nn.Module) -> int:
    """Replaces every nn.Linear under `model` by a PackedLinear holding the same weights;
    returns how many. The original weights are freed."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child.weight, child.bias))
    return len(targets)


def packed_logits_head(embedding: torch.Tensor) -> PackedLinear:
    """A packed copy of a tied embedding matrix for the vocabulary projection (the
    embedding itself must stay readable for the token lookup)."""
    return PackedLinear(embedding, None)
