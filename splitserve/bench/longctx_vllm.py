"""`splitserve bench longctx --engine vllm`: the longctx table with vLLM doing the compute.

Aggregated: one `vllm serve` on every core. Disaggregated: a prefill and a decode `vllm
serve` with SplitserveConnector (one core each, as `splitserve serve` divides them between
its two workers) behind `splitserve vllm-proxy`. Same prompts, same client, same columns
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
            workdir: Path) -> tuple[dict[int, float], dict[int, float], dict[int, dict], dict]:
    """(aggregated TTFT, disaggregated TTFT, KV counter deltas, ceiling) per length."""
    ceiling = _ceiling(model, max(lengths), args.repeats, workdir)
    cores = sorted(os.sched_getaffinity(0))
    common = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(max(lengths) + 16),
              *args.serve_arg]
    with VllmServe(model, workdir / "aggregated.log", cores=_cores(cores),
                   args=common) as agg:
        agg.wait()
        agg_ttft = {n: ttft(agg.base_url, prompts[n]) for n in lengths}
    half = max(len(cores) // 2, 1)
    dis_ttft, deltas = {}, {}
    with VllmPair(model, workdir, p_cores=_cores(cores[:half]),
                  d_cores=_cores(cores[half:] or cores), args=common,
                  transfer={"transport": args.kv_transport}) as pair:
        for n in lengths:
            before, logged = kv_counters(pair.d.base_url), len(_LOADED.findall(pair.d.log()))
            dis_ttft[n] = ttft(pair.base_url, prompts[n])
            deltas[n] = _settled(pair.d, before, logged, args.repeats)
    return agg_ttft, dis_ttft, deltas, ceiling


def _cores(ids: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND's form of a set of cores."""
    return ",".join(map(str, ids))


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
