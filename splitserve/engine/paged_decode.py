"""Decode attention that reads the paged KV cache in place.

`paged_decode_attention` attends one query token per sequence over that sequence's KV
blocks without first gathering them into a padded tensor: a C++ kernel
(csrc/paged_decode.cpp) walks each sequence's block table and reads the K/V rows straight
from the pool view it is given. The kernel is compiled once per machine (splitserve.native).
Where it cannot be built (no compiler) or the tensors are not on the CPU, the same call
runs the gather + SDPA path instead, which gives the same result more slowly; a failed
build is logged once as a WARNING.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from splitserve.native import NativeExtension

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)

KERNEL = NativeExtension("splitserve_paged_decode", Path(__file__).with_name("csrc") / "paged_decode.cpp",
                         fallback="decode attention falls back to gather + SDPA (slower)")


class PagedDecodeInputError(ValueError):
    """The arguments do not describe a valid decode batch (shapes, dtypes, lengths, block ids)."""


def kernel_available() -> bool:
    """True when the C++ kernel is built and loaded (building it on the first call)."""
    return KERNEL.load() is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V for one query token per sequence, over its paged KV.

    q: [B, Hq, D] float32/bfloat16/float16 (any strides). k_cache, v_cache: [num_blocks,
    block_size, Hkv, D], both float32, bfloat16 or float16 (q's dtype may differ), unit
    stride on the last dim (e.g. kv[:, layer, 0] of the engine's pool), Hq % Hkv == 0. block_tables: [B, max_blocks] int32/int64; entries
    past a sequence's ceil(len / block_size) blocks are padding and never read.
    seq_lens: [B] integer, 1 <= len <= max_blocks * block_size. scale defaults to D**-0.5.
    All on one device; off the CPU (or without the kernel) the gather + SDPA path runs.
    Returns [B, Hq, D] in q's dtype. Raises PagedDecodeInputError on invalid input.
    """
    _check_metadata(q, k_cache, v_cache, block_tables, seq_lens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[0] == 0:
        return torch.empty_like(q)
    block_tables = block_tables.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    return decode_prepared(q, k_cache, v_cache, block_tables, seq_lens, float(scale))


def decode_prepared(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_decode_attention for a caller that built its arguments to the contract itself
    (the engine's attention, once per layer of a step): q with unit last stride, tables
    and lens int64 contiguous, B >= 1. Skips the metadata checks and conversions (~20 us a
    call, a fifth of the kernel's time for one sequence of 300 tokens); the kernel's value
    checks (lengths, block ids) still run."""
    module = KERNEL.load() if q.device.type == "cpu" else None
    if module is None:
        return gather_sdpa_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    try:
        return module.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    except ValueError as e:  # the kernel's check of lengths and block ids, before any read
        raise PagedDecodeInputError(str(e).split("\n", 1)[0]) from None


def gather_sdpa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention by copying each sequence's blocks into a padded [B, S] tensor and
    running masked SDPA: the path the engine took before the kernel, and its fallback."""
    bs = k_cache.shape[1]
    tables = block_tables.to(torch.int64)
    lens = seq_lens.to(torch.int64).to(tables.device)
    _check_values(tables, lens, k_cache.shape[0], bs)
    b, nb = tables.shape
    used = torch.arange(nb, device=tables.device)[None, :] < ((lens + bs - 1) // bs)[:, None]
    tables = torch.where(used, tables, 0)  # padding entries may hold anything
    ks = k_cache[tables].reshape(b, nb * bs, *k_cache.shape[2:]).transpose(1, 2).to(q.dtype)
    vs = v_cache[tables].reshape(b, nb * bs, *v_cache.shape[2:]).transpose(1, 2).to(q.dtype)
    mask = (torch.arange(nb * bs, device=tables.device)[None, :] < lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=mask.to(q.device),
                                       scale=scale, enable_gqa=True)
    return o.squeeze(2)


def _check_metadata(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    """Shape/dtype/layout checks: attribute reads only, no tensor ops."""
    def bad(msg: str):
        raise PagedDecodeInputError(msg)

    if q.dim() != 3:
        bad(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        bad(f"k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dtype not in _DTYPES or k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        bad(f"q and the caches must be float32, bfloat16 or float16 (caches alike), got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}")
    b, hq, d = q.shape
    _, _, hkv, dk = k_cache.shape
    if d != dk:
        bad(f"head dim of q ({d}) differs from the cache's ({dk})")
    if hkv == 0 or hq % hkv:
        bad(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        bad("the caches' last dim must be contiguous (a view of the pool, not a transposed copy)")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype not in _INDEX_DTYPES:
        bad(f"block_tables must be [B={b}, max_blocks] int32/int64, got "
            f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if seq_lens.shape != (b,) or seq_lens.dtype not in _INDEX_DTYPES:
        bad(f"seq_lens must be [B={b}] int32/int64, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:  # the kernel reads every one of them through a CPU pointer
        bad(f"q, the caches, block_tables and seq_lens must be on one device, got {sorted(map(str, devices))}")


def _check_values(tables: torch.Tensor, lens: torch.Tensor, num_blocks: int, bs: int) -> None:
    """The kernel's value checks (csrc check_values), for the torch path."""
    nb = tables.shape[1]
    if bool(((lens < 1) | (lens > nb * bs)).any()):
        raise PagedDecodeInputError(f"seq_lens must lie in [1, max_blocks * block_size = {nb * bs}], "
                                    f"got {lens.tolist()}")
    used = torch.arange(nb, device=tables.device)[None, :] < ((lens + bs - 1) // bs)[:, None]
    ids = tables[used]
    if bool(((ids < 0) | (ids >= num_blocks)).any()):
        raise PagedDecodeInputError(f"block_tables holds ids outside [0, {num_blocks}) in a sequence's blocks")
