"""`splitserve bench longctx --engine vllm`: the longctx table with vLLM doing the compute.

Aggregated: one `vllm serve` on every core, then one on the prefill side's cores only.
Disaggregated: a prefill and a decode `vllm serve` with SplitserveConnector (half the
cores each, as `splitserve serve --engine vllm` binds its two workers) behind
`splitserve vllm-proxy`. Same prompts, same client, same columns
as our engine's run. Transferred-or-recomputed comes from the decode server's /metrics
(`splitserve_kv_transfers_total`, `..._fallbacks_total`, `..._bytes_total`); vLLM's
/metrics has no transfer-seconds histogram, so the fetch time is read from the decode
server's "KV loaded ... in S s" log lines (one per transfer).

Ceiling, measured first in the same run: `splitserve bench transfer --paths socket,tcp`
on KV of the same block size and bytes per block: a plain loopback socket blast, and our
protocol with no model behind it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from splitserve.bench.longctx import kv_counters, ttft
from splitserve.bench.vllm_launch import BLOCK_SIZE, VllmPair, VllmServe

_LOADED = re.compile(r"KV loaded, \d+ blocks, (\d+) bytes in ([\d.]+)s")


def measure(args, model: str, lengths: list[int], prompts: dict[int, list[list[int]]],
            workdir: Path) -> tuple[dict[str, dict[int, float]], dict[int, dict], dict]:
    """(TTFT per run per length, D's KV counter deltas per length, ceiling)."""
    ceiling = _ceiling(model, max(lengths), args.repeats, workdir)
    cores = sorted(os.sched_getaffinity(0))
    half = max(len(cores) // 2, 1)     # as `serve --engine vllm` binds its two workers
    p_cores, d_cores = cores[:half], cores[half:] or cores
    common = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(max(lengths) + 16),
              *args.serve_arg]
    ttfts: dict[str, dict[int, float]] = {}
    for run_name, run_cores in (("agg", cores), ("agg_p", p_cores)):
        with VllmServe(model, workdir / f"{run_name}.log", cores=run_cores,
                       args=common) as agg:
            agg.wait()
            ttfts[run_name] = {n: ttft(agg.base_url, prompts[n]) for n in lengths}
    ttfts["disagg"], deltas = {}, {}
    with VllmPair(model, workdir, p_cores=p_cores, d_cores=d_cores, args=common,
                  transfer={"transport": args.kv_transport}) as pair:
        for n in lengths:
            before, logged = kv_counters(pair.d.base_url), len(_LOADED.findall(pair.d.log()))
            ttfts["disagg"][n] = ttft(pair.base_url, prompts[n])
            deltas[n] = _settled(pair.d, before, logged, args.repeats)
    return ttfts, deltas, ceiling


def _settled(d: VllmServe, before: dict, logged: int, repeats: int,
             timeout: float = 30.0) -> dict:
    """D's counter deltas once every request of the length is counted (transferred or
    fallen back) and each transfer's fetch time is logged: vLLM publishes connector stats
    with its engine steps, not with the response."""
    deadline = time.monotonic() + timeout
    while True:
        now = kv_counters(d.base_url)
        delta = {k: now[k] - before[k] for k in now}
        times = [float(s) for _, s in _LOADED.findall(d.log())[logged:]]
        settled = delta["ok"] + delta["fallbacks"] >= repeats and len(times) >= delta["ok"]
        if settled or time.monotonic() > deadline:
            delta["seconds"] = sum(times)
            return delta
        time.sleep(0.2)


def _ceiling(model: str, tokens: int, repeats: int, workdir: Path) -> dict:
    """{"socket": GB/s, "tcp": GB/s} from `bench transfer` on this model's KV bytes per
    block (vLLM CPU float32 K and V; bench transfer's bf16 with head_dim doubled)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    out = workdir / "ceiling.json"
    cmd = [sys.executable, "-m", "splitserve", "bench", "transfer", "--paths", "socket,tcp",
           "--tokens", str(tokens), "--layers", str(cfg["num_hidden_layers"]),
           "--kv-heads", str(cfg.get("num_key_value_heads", heads)),
           "--head-dim", str(2 * head_dim), "--block-size", str(BLOCK_SIZE),
           "--pool-mib", "64", "--repeats", str(repeats), "--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    paths = json.loads(out.read_text())["paths"]
    return {p: paths[p]["median_gbps"] for p in ("socket", "tcp")}
