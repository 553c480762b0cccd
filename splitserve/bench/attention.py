"""`splitserve bench attention`: decode attention per decode step, the paged kernel
(splitserve/engine/paged_decode.py) against the gather + masked SDPA the engine ran before.

Shapes are SmolLM2-135M's (9 query heads, 3 kv heads, head dim 64, 30 layers, blocks of 16
tokens); the pool is laid out as the engine's, kv[num_blocks, layers, 2, block, Hkv, D],
with every sequence's blocks in random order, and a step attends every layer once. The
pool holds exactly the blocks the batch needs (B=32 at 2000 tokens: 2.9 GB in float32).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from splitserve.bench.report import machine, median, print_table, write_json
from splitserve.engine.paged_decode import kernel_available, paged_decode_attention


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", default="1,16,32", help="comma-separated decode batch sizes")
    p.add_argument("--context", default="300,2000", help="comma-separated tokens per sequence")
    p.add_argument("--dtypes", default="float32,bfloat16", help="pool and query dtypes")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per point; medians reported")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write results to this path")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernel_available():
        print("the paged decode kernel did not build here (see the WARNING above); nothing to compare")
        return 1
    rows, results = [], []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for b in (int(x) for x in args.batch.split(",")):
            for ctx in (int(x) for x in args.context.split(",")):
                kernel_ms, gather_ms = _point(args, dtype, b, ctx)
                rows.append([dtype_name, b, ctx, kernel_ms, gather_ms, gather_ms / kernel_ms])
                results.append({"dtype": dtype_name, "batch": b, "context": ctx,
                                "kernel_ms_per_step": kernel_ms, "gather_sdpa_ms_per_step": gather_ms})
    info = machine()
    info["load_average_1min_at_end"] = os.getloadavg()[0]
    print(f"machine: {info}")
    print_table(["dtype", "B", "ctx", "kernel ms/step", "gather+SDPA ms/step", "speedup"], rows,
                title=f"\nattention: decode attention over {args.layers} layers per step, "
                      f"Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim} block={args.block_size}, "
                      f"medians of {args.repeats}")
    write_json(args.json, {"machine": info, "results": results})
    return 0


def _point(args, dtype: torch.dtype, batch: int, ctx: int) -> tuple[float, float]:
    bs, layers = args.block_size, args.layers
    per_seq = -(-ctx // bs)
    num_blocks = batch * per_seq
    kv = torch.empty(num_blocks, layers, 2, bs, args.kv_heads, args.head_dim, dtype=dtype).uniform_(-1, 1)
    tables = torch.randperm(num_blocks).reshape(batch, per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int64)
    q = torch.randn(batch, args.q_heads, args.head_dim).to(dtype)
    scale = args.head_dim ** -0.5

    def kernel_step():
        for layer in range(layers):
            paged_decode_attention(q, kv[:, layer, 0], kv[:, layer, 1], tables, lens, scale)

    # What engine/attention.py did per layer: the mask is built once per step, the blocks
    # are gathered (and padded) per layer.
    def gather_step():
        mask = (torch.arange(per_seq * bs)[None, :] < lens[:, None])[:, None, None, :]
        for layer in range(layers):
            k_cache, v_cache = kv[:, layer, 0], kv[:, layer, 1]
            ks = k_cache[tables].reshape(batch, per_seq * bs, *k_cache.shape[2:])
            vs = v_cache[tables].reshape(batch, per_seq * bs, *v_cache.shape[2:])
            F.scaled_dot_product_attention(q.unsqueeze(2), ks.transpose(1, 2), vs.transpose(1, 2),
                                           attn_mask=mask, scale=scale, enable_gqa=True)

    with torch.inference_mode():
        return _median_ms_interleaved(kernel_step, gather_step, args.repeats)


def _median_ms_interleaved(a, b, repeats: int) -> tuple[float, float]:
    """Median ms of a and of b, run alternately so that both see the same load on a
    shared machine (back to back, one could get a quiet minute and the other a busy one)."""
    a(), b()  # warm-up: first touch of the pool, allocator, kernel load
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return median(times_a) * 1e3, median(times_b) * 1e3
