"""Linear layers as prepacked oneDNN matmuls, for bfloat16 models on CPU.

`F.linear` in bfloat16 re-lays-out its weight on every call and reaches about 17 GB/s
streaming weights at decode batch sizes on this class of machine (Xeon with AMX); the
same weights reordered once into oneDNN's blocked format run the AMX kernels directly:
1.3-2.4x faster for 1-512 rows on SmolLM2's shapes (splitserve bench engine; vLLM's CPU
build prepacks its weights for the same reason). float32 stays on `F.linear`: there the
packed kernel was no faster at one row and only sometimes at 16, while MKL's GEMV already
streams weights at memory bandwidth.

A packed weight is an opaque oneDNN tensor: it can only be multiplied, never read or
copied into, so packing happens once, after every weight is loaded.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W reordered for oneDNN. Inputs are [rows, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
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
