"""Decode attention over the paged KV cache, read in place (splitserve/engine/paged_decode.py).

The reference is independent of the module: each sequence's tokens are gathered one by one
from the pool and attended with plain SDPA (no mask, no padding).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine import paged_decode as pd
from splitserve.engine.paged_decode import PagedDecodeInputError, kernel_available, paged_decode_attention

BS = 16
D = 64
LENS = [1, 15, 16, 17, 300, 1000]
# The kernel accumulates in float32: at 16-bit dtypes the output's rounding dominates.
TOL_16 = {torch.bfloat16: 1e-2,   # 8 mantissa bits: rounding alone is up to 0.4% of |out|
          torch.float16: 2e-3}    # 11 bits: up to 0.05%


def _reference(q, k_cache, v_cache, tables, lens, scale):
    bs = k_cache.shape[1]
    out = []
    for b, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        blocks, offsets = tables[b, t // bs].long(), t % bs       # token t's block and slot in it
        k = k_cache[blocks, offsets].float()                      # [n, Hkv, D]
        v = v_cache[blocks, offsets].float()
        o = F.scaled_dot_product_attention(q[b].float()[:, None, :], k.transpose(0, 1), v.transpose(0, 1),
                                           scale=scale, enable_gqa=True)
        out.append(o[:, 0, :])
    return torch.stack(out)


def _batch(hq, hkv, dtype, lens=LENS, layers=3, seed=0, head_dim=D, block_size=BS):
    """A pool laid out as the engine's kv[num_blocks, layers, 2, block, Hkv, D], block
    tables drawn in random order from it, and one query per sequence."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = len(lens) * max_blocks + 7
    kv = torch.randn(num_blocks, layers, 2, block_size, hkv, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[:len(lens) * max_blocks].reshape(len(lens), max_blocks)
    q = torch.randn(len(lens), hq, head_dim, generator=g).to(dtype)
    return kv, tables, torch.tensor(lens), q


def test_kernel_builds_on_this_machine():
    # Fails (never skips) when the build breaks: the fallback would hide a slow engine.
    assert kernel_available(), pd._load_error


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2)])
def test_float32_matches_reference_on_a_strided_pool_view(hq, hkv):
    kv, tables, lens, q = _batch(hq, hkv, torch.float32)
    layer = 1
    k_cache, v_cache = kv[:, layer, 0], kv[:, layer, 1]
    assert not k_cache.is_contiguous()
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=D ** -0.5)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, tables, lens, D ** -0.5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2)])
def test_16_bit_pools_match_reference_within_their_rounding(hq, hkv, dtype):
    kv, tables, lens, q = _batch(hq, hkv, dtype)
    k_cache, v_cache = kv[:, 2, 0], kv[:, 2, 1]
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference(q, k_cache, v_cache, tables, lens, D ** -0.5),
                               atol=TOL_16[dtype], rtol=TOL_16[dtype])


def test_a_large_ragged_batch_matches_reference():
    lens = torch.randint(1, 700, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    kv, tables, lens, q = _batch(9, 3, torch.float32, lens=lens, layers=2)
    out = paged_decode_attention(q, kv[:, 1, 0], kv[:, 1, 1], tables, lens)
    torch.testing.assert_close(out, _reference(q, kv[:, 1, 0], kv[:, 1, 1], tables, lens, D ** -0.5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads,lens", [(2, [2000]), (4, [1500, 3, 40, 2500]), (3, [17, 900, 600])])
def test_sequences_split_among_threads_are_merged_exactly(threads, lens):
    # Threads take equal shares of the batch's blocks, so these sequences are cut
    # mid-way (one thread may end one sequence and start the next) and merged after.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kv, tables, lens, q = _batch(9, 3, torch.float32, lens=lens, layers=1)
        out = paged_decode_attention(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, _reference(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens, D ** -0.5),
                               atol=1e-5, rtol=1e-5)


# 64 and 128 have compiled-in row loops; other head dims take the runtime loop, 72 with a
# partial last vector. Block sizes other than the default 16 as the engine may be configured.
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (80, 16), (72, 8), (32, 32), (64, 1)])
def test_other_head_dims_and_block_sizes(head_dim, block_size):
    kv, tables, lens, q = _batch(8, 2, torch.float32, lens=[1, 7, 8, 9, 100], head_dim=head_dim,
                                 block_size=block_size)
    out = paged_decode_attention(q, kv[:, 1, 0], kv[:, 1, 1], tables, lens)
    torch.testing.assert_close(out, _reference(q, kv[:, 1, 0], kv[:, 1, 1], tables, lens, head_dim ** -0.5),
                               atol=1e-5, rtol=1e-5)


def test_bfloat16_query_over_a_float32_pool():
    kv, tables, lens, q = _batch(9, 3, torch.float32, lens=[3, 50])
    q = q.bfloat16()
    out = paged_decode_attention(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens, D ** -0.5),
                               atol=TOL_16[torch.bfloat16], rtol=TOL_16[torch.bfloat16])


def test_float32_query_over_a_bfloat16_pool_is_exact_to_the_widened_values():
    kv, tables, lens, q = _batch(9, 3, torch.bfloat16)
    q = q.float()
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, tables, lens, D ** -0.5),
                               atol=1e-5, rtol=1e-5)


def test_strided_query_padding_entries_and_scale():
    kv, tables, lens, _ = _batch(9, 3, torch.float32, lens=[5, 40, 33])
    # q as a slice of a fused projection: [B, Hq, D] with a row stride larger than Hq * D.
    qkv = torch.randn(3, 15, D)
    q = qkv[:, :9]
    assert not q.is_contiguous()
    tables = tables.clone()
    tables[0, 1:] = 10 ** 9          # past a sequence's blocks: padding, never read
    tables[2, 3:] = -1
    out = paged_decode_attention(q, kv[:, 0, 0], kv[:, 0, 1], tables.to(torch.int32), lens, scale=0.3)
    torch.testing.assert_close(out, _reference(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens, 0.3),
                               atol=1e-5, rtol=1e-5)


def _bad_inputs():
    kv, tables, lens, q = _batch(9, 3, torch.float32, lens=[5, 40], layers=1)
    k, v = kv[:, 0, 0], kv[:, 0, 1]
    num_blocks = k.shape[0]
    oob, neg = tables.clone(), tables.clone()
    oob[1, 2] = num_blocks
    neg[0, 0] = -1
    return {
        "block id past the pool": (q, k, v, oob, lens),
        "negative block id": (q, k, v, neg, lens),
        "zero length": (q, k, v, tables, torch.tensor([0, 40])),
        "length past the table": (q, k, v, tables, torch.tensor([5, tables.shape[1] * BS + 1])),
        "heads not a multiple": (torch.randn(2, 8, D), k, v, tables, lens),
        "head dim differs": (torch.randn(2, 9, 32), k, v, tables, lens),
        "float64": (q.double(), k.double(), v.double(), tables, lens),
        "caches differ in dtype": (q, k, v.bfloat16(), tables, lens),
        "float block table": (q, k, v, tables.float(), lens),
        "batch mismatch": (q, k, v, tables[:1], lens),
        "cache rows not contiguous": (q, *(torch.randn(*k.shape[:3], 2 * D)[..., ::2] for _ in "kv"),
                                      tables, lens),
        "q not 3-d": (q[None], k, v, tables, lens),
        "block table on another device": (q, k, v, tables.to("meta"), lens),
        "lengths on another device": (q, k, v, tables, lens.to("meta")),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_invalid_input_raises_a_value_error(case):
    with pytest.raises(PagedDecodeInputError):
        paged_decode_attention(*_bad_inputs()[case])
    assert issubclass(PagedDecodeInputError, ValueError)


def test_without_the_kernel_the_torch_path_gives_the_same_result_and_warns_once(no_compiler, caplog):
    no_compiler(pd.KERNEL)
    kv, tables, lens, q = _batch(9, 3, torch.float32)
    with caplog.at_level(logging.WARNING, logger="splitserve.native"):
        out = paged_decode_attention(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens)
        paged_decode_attention(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens)
        assert not kernel_available()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    torch.testing.assert_close(out, _reference(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens, D ** -0.5),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(PagedDecodeInputError):
        paged_decode_attention(*_bad_inputs()["block id past the pool"])


@pytest.mark.slow  # compiles the kernel from scratch: 25-60 s
def test_a_build_killed_mid_way_does_not_hang_the_next_build(tmp_path, monkeypatch):
    # torch's lock file outlives a killed build, and torch's load() waits for it to go
    # away before building: the next process would hang on its first decode step.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build_dir, _ = pd.KERNEL.build_dir()
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    done = subprocess.run(
        [sys.executable, "-c", "from splitserve.engine.paged_decode import kernel_available as k; "
                               "raise SystemExit(0 if k() else 1)"],
        timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (build_dir / "splitserve_paged_decode.so").exists()
