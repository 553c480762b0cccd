"""The KV tensor and how big it is.

Layout: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], contiguous.
NOTE: one block is one contiguous byte range across all layers, so a run of blocks moves
between processes as a few large copies (the disaggregated hand-off relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.model.config import ModelArchConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_KV_CACHE_FRACTION_OF_MAX_LEN = 4  # default pool: room for this many full-length sequences
DEFAULT_KV_CACHE_CAP_BYTES = 2 * 1024**3


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @classmethod
    def for_model(cls, arch: ModelArchConfig, block_size: int, dtype: str) -> "KVLayout":
        return cls(arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size, dtype)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch_dtype(self.dtype).itemsize

    def num_blocks_for(self, kv_cache_memory: int | None, max_model_len: int) -> int:
        if kv_cache_memory is None:
            per_seq = -(-max_model_len // self.block_size) * self.block_nbytes
            kv_cache_memory = min(DEFAULT_KV_CACHE_FRACTION_OF_MAX_LEN * per_seq,
                                  DEFAULT_KV_CACHE_CAP_BYTES)
            kv_cache_memory = max(kv_cache_memory, per_seq)
        return max(kv_cache_memory // self.block_nbytes, 1)

    def allocate(self, num_blocks: int, device: str, allocator=None) -> torch.Tensor:
        """allocator(shape, dtype) -> tensor lets a worker place the KV in memory a peer
        process can map (shared-memory KV transfer); default: ordinary device memory."""
        shape = (num_blocks, *self.block_shape)
        if allocator is not None:
            return allocator(shape, torch_dtype(self.dtype))
        return torch.zeros(shape, dtype=torch_dtype(self.dtype), device=device)
