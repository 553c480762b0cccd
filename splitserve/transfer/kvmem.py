"""Byte views of a paged KV tensor: the only place the data plane touches tensor memory.

Layout contract with the engine: `kv` is one contiguous tensor of shape
[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], so physical block b is
the single byte range [b * block_nbytes, (b + 1) * block_nbytes). A run of adjacent
physical ids is one larger range, which the transports move with one copy / one iovec.
"""

from __future__ import annotations

from typing import Sequence

import torch

LAYOUT = "blocks,layers,kv,block_size,kv_heads,head_dim"


class KVBlocks:
    def __init__(self, kv: torch.Tensor):
        if kv.dim() != 6:
            raise ValueError(f"kv must have 6 dims ({LAYOUT}), got shape {tuple(kv.shape)}")
        if not kv.is_contiguous():
            raise ValueError("kv must be contiguous so that a block is one byte range")
        if kv.device.type != "cpu":
            # NOTE: CUDA KV needs a pinned staging buffer; not part of this transport yet.
            raise ValueError(f"kv must live in CPU memory for tcp/shm, got {kv.device}")
        self.kv = kv  # keeps the memory alive as long as the views exist
        self.num_blocks = kv.shape[0]
        self.block_size = kv.shape[3]
        self.block_nbytes = kv[0].numel() * kv.element_size()
        self.mem = memoryview(kv.view(torch.uint8).reshape(-1).numpy())

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        for b in ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"{what}: block id {b} outside 0..{self.num_blocks - 1}")

    def views(self, ids: Sequence[int]) -> list[memoryview]:
        """Views of blocks `ids` in order, adjacent ids merged into one view.

        Callers must have validated `ids` (check_ids); this runs per frame, so it does not
        re-check.
        """
        out: list[memoryview] = []
        n = self.block_nbytes
        start = prev = ids[0]
        for b in ids[1:]:
            if b != prev + 1:
                out.append(self.mem[start * n:(prev + 1) * n])
                start = b
            prev = b
        out.append(self.mem[start * n:(prev + 1) * n])
        return out


def kv_fingerprint(kv: torch.Tensor, **model: object) -> dict[str, str]:
    """What P and D must agree on before a single byte of KV is interpreted.

    The KV geometry comes from the tensor itself; the engine adds what the tensor cannot
    show (architecture, model hash/revision, TP rank and size, rope settings, ...).
    """
    fp = {"kv_layout": LAYOUT,
          "kv_block_shape": "x".join(str(d) for d in kv.shape[1:]),
          "kv_dtype": str(kv.dtype).removeprefix("torch.")}
    fp.update({k: str(v) for k, v in model.items()})
    return fp


def describe_mismatch(ours: dict[str, str], theirs: dict[str, str]) -> str:
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    diff = ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys)
    return f"differs in {diff}"
