"""The decoder layer's elementwise ops, fused in C++ on CPU (csrc/layer_ops.cpp).

Each function has a torch path with the same numerics, taken off the CPU, for dtypes or
layouts the kernel does not cover (the kernel itself says so: its checks cost less in C++
than in Python), and when the kernel cannot be built (no compiler; logged once). Functions that say "in place" may instead return new tensors on the torch
path: callers use what they return and do not read their inputs again.

Set SPLITSERVE_FUSED_OPS=0 to run the torch path everywhere (for A/B measurements and for
checking the kernels against it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from splitserve.native import NativeExtension

KERNELS = NativeExtension("splitserve_layer_ops", Path(__file__).with_name("csrc") / "layer_ops.cpp",
                          fallback="the model runs its norms, rotary and MLP activation unfused (slower)",
                          extra_cflags=("-ffp-contract=off",))


# Read once: the check runs four times per layer per step.
ENABLED = os.environ.get("SPLITSERVE_FUSED_OPS", "1") != "0"


def _kernels():
    return KERNELS.load() if ENABLED else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] -> a new [T, H]: x / rms(x) * weight (transformers' LlamaRMSNorm)."""
    module = _kernels()
    out = None if module is None else module.rms_norm(x, weight, eps)
    if out is not None:
        return out
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), in place: x, residual [T, H]."""
    module = _kernels()
    if module is not None and module.add_rms_norm_(x, residual, weight, eps):
        return x, residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hkv, D] (views of the qkv
    projection are fine), in place; cos, sin: [T, D] in q's dtype."""
    module = _kernels()
    if module is not None and module.rotary_(q, k, cos, sin):
        return q, k
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The first and second halves of head_dim form the pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate columns first) -> a new [T, I]: silu(gate) * up."""
    module = _kernels()
    out = None if module is None else module.silu_mul(gate_up)
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
