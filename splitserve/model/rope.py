"""Rotary position embeddings, rotate-half convention (as Hugging Face Llama / Qwen2).

Only the inverse frequencies are kept (head_dim / 2 floats); cos/sin are computed per
forward from the positions actually in the batch. A table for every position up to the
context length (131,072 for Llama 3.1) would cost memory for nothing, and positions in a
mixed batch are scattered anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from splitserve.model.config import ModelArchConfig


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """float32 [head_dim // 2], built on CPU whatever the default device is (the model may
    be constructed on the meta device; these are not weights and are never loaded)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is not None:
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 context extension: components whose wavelength is short compared with the
    original context keep their frequency, long ones are slowed down by `factor`, and the
    band in between is interpolated linearly in (original_context / wavelength)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original_ctx = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original_ctx / low, inv_freq / factor, inv_freq)
    # smooth = 0 at the low-frequency edge (fully scaled), 1 at the high-frequency edge.
    smooth = (original_ctx / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= original_ctx / high) & (wavelength <= original_ctx / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelArchConfig):
        super().__init__()
        # NOTE: a plain attribute, not a buffer: Module.to(dtype) would round a buffer to
        # bf16, and these frequencies must stay float32 to match the reference numerics.
        self.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, head_dim] in `dtype` (model.fused_ops.rotary applies them)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

