"""`splitserve bench longctx`: time to first token, aggregated vs disaggregated, per
prompt length, through the OpenAI API of a real `splitserve serve` (or, with `--engine
vllm`, of plain `vllm serve` processes: longctx_vllm.py); plus, for the disaggregated run,
the KV transfer rate and whether the KV was transferred or recomputed (from the decode
side's metrics, not assumed).

"agg on P's cores" is TTFT aggregated on the cores the disaggregated run's prefill side
computes on: disaggregated over that is the hand-off's own cost, apart from the cores it
gives the decode side. `splitserve serve` lets both workers use every core (an idle engine
leaves them to the busy one), so for our engine that is the aggregated run itself; vLLM
servers are bound to half the cores each (longctx_vllm.py), so vLLM measures it apart.

Prompts have exact token counts: real tokens from the model's tokenizer (a long text
tokenized once, cut to length), sent as token ids so no re-tokenization can shift them;
every request's prompt is distinct from its first block, so no prefix-cache hit hides a
prefill.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from splitserve.bench.launch import ServeProcess
from splitserve.bench.report import machine, median, print_table, write_json


ENGINES = ("splitserve", "vllm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default=ENGINES[0], choices=ENGINES,
                   help="splitserve: `splitserve serve` aggregated vs 1 prefill + 1 decode; vllm: "
                        "one `vllm serve` vs two with SplitserveConnector behind `splitserve "
                        "vllm-proxy` (default: %(default)s)")
    p.add_argument("--lengths", default="1k,8k,32k", help="prompt lengths, e.g. 1k,8k,32k,128k")
    p.add_argument("--model", help="checkpoint directory (default: a tiny random Llama with 131k "
                                    "positions, head_dim 32: the smallest vLLM CPU serves)")
    p.add_argument("--repeats", type=int, default=3, help="requests per length; medians reported")
    p.add_argument("--kv-transport", default="tcp", choices=("tcp", "shm", "auto"))
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra flag for every server run, splitserve serve or vllm serve (repeatable), "
                        "e.g. --serve-arg=--max-num-batched-tokens=8192")
    p.add_argument("--json", help="write results to this path")


def _parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def run(args) -> int:
    lengths = [_parse_length(x) for x in args.lengths.split(",")]
    ceiling = None
    with tempfile.TemporaryDirectory() as d:
        model = args.model
        if model is None:
            from splitserve.model.tiny import make_tiny_llama

            model = str(make_tiny_llama(Path(d) / "model", max_position_embeddings=131072,
                                        hidden_size=128, head_dim=32))
        prompts = _exact_prompts(model, lengths, args.repeats)
        if args.engine == "vllm":
            from splitserve.bench.longctx_vllm import measure

            ttfts, deltas, ceiling = measure(args, model, lengths, prompts, Path(d))
        else:
            ttfts, deltas = _measure(args, model, lengths, prompts)
    rows, results = [], []
    for n in lengths:
        delta = deltas[n]
        ok, fallbacks = delta["ok"], delta["fallbacks"]
        gbps = delta["bytes"] / delta["seconds"] / 1e9 if delta["seconds"] else 0.0
        kv = "transferred" if ok == args.repeats and not fallbacks else f"{fallbacks:.0f} fallback(s)"
        agg, agg_p, dis = ttfts["agg"][n], ttfts["agg_p"][n], ttfts["disagg"][n]
        rows.append([n, agg, agg_p, dis, dis / agg, dis / agg_p, gbps, kv])
        results.append({"tokens": n, "ttft_aggregated_s": agg, "ttft_aggregated_prefill_cores_s": agg_p,
                        "ttft_disaggregated_s": dis, "ratio": dis / agg,
                        "ratio_to_prefill_cores": dis / agg_p, "transfer_gb_s": gbps, "kv": kv,
                        "kv_bytes_per_request": delta["bytes"] / max(ok + fallbacks, 1)})
    print(f"machine: {machine()}")
    print_table(["prompt tokens", "TTFT agg s", "TTFT agg on P's cores s", "TTFT disagg s", "disagg/agg",
                 "disagg/agg on P's cores", "KV GB/s over fetch (incl. compute wait)", "KV"], rows,
                title=f"\nlongctx ({args.engine}): medians of {args.repeats} (transport {args.kv_transport})")
    if ceiling:
        print(f"ceiling, same run (bench transfer, {max(lengths)} tokens of this model's KV): "
              f"loopback socket {ceiling['socket']:.2f} GB/s, our protocol alone over tcp "
              f"{ceiling['tcp']:.2f} GB/s")
    write_json(args.json, {"machine": machine(), "engine": args.engine, "transport": args.kv_transport,
                           "ceiling_gb_s": ceiling, "results": results})
    return 0


def _measure(args, model: str, lengths: list[int], prompts: dict[int, list[list[int]]]):
    """Our engine: (TTFT per run per length, decode worker's KV counter deltas per length)."""
    common = ["--model", model, "--max-model-len", str(max(lengths) + 16), *args.serve_arg]
    with ServeProcess("--aggregated", *common) as agg:
        ttfts = {"agg": {n: ttft(agg.base_url, prompts[n]) for n in lengths}}
    ttfts["agg_p"] = ttfts["agg"]      # serve's prefill worker computes on every core
    ttfts["disagg"], deltas = {}, {}
    with ServeProcess("--kv-transport", args.kv_transport, *common) as dis:
        decode = dis.worker_urls("decode")[0]
        for n in lengths:
            before = kv_counters(decode)
            ttfts["disagg"][n] = ttft(dis.base_url, prompts[n])
            after = kv_counters(decode)
            deltas[n] = {k: after[k] - before[k] for k in after}
    return ttfts, deltas


def _exact_prompts(model: str, lengths: list[int], repeats: int) -> dict[int, list[list[int]]]:
    """repeats distinct prompts per length. They differ from their first block on, so
    neither the prefix cache nor an earlier length can turn a prefill into a lookup."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    words = ["alpha", "river", "quantum", "stone", "lantern", "orbit", "meadow", "cipher", "ember",
             "harbor", "violet", "summit", "thread", "echo", "granite", "willow"]
    ids: list[int] = []
    while len(ids) < max(lengths) + 64:
        text = " ".join(rng.choice(words) for _ in range(4096)) + ". "
        ids += tok(text, add_special_tokens=False)["input_ids"]
    prompts = {}
    for k, n in enumerate(lengths):
        prompts[n] = []
        for r in range(repeats):
            head = tok(f"Document {k}-{r}:", add_special_tokens=False)["input_ids"]
            prompts[n].append((head + ids)[:n])
    return prompts


def ttft(base_url: str, prompts: list[list[int]]) -> float:
    times = []
    with httpx.Client(timeout=None) as client:
        model = client.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
            t0 = time.perf_counter()
            first = None
            with client.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():   # read to the end: the request completes
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter() - t0
            times.append(first)
    return median(times)


def kv_counters(worker_url: str) -> dict[str, float]:
    out = {"ok": 0.0, "fallbacks": 0.0, "bytes": 0.0, "seconds": 0.0}
    text = httpx.get(f"{worker_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "splitserve_kv_transfers_total" and s.labels.get("outcome") == "ok":
                out["ok"] += s.value
            elif s.name == "splitserve_kv_transfer_fallbacks_total":
                out["fallbacks"] += s.value
            elif s.name == "splitserve_kv_transfer_bytes_total" and s.labels.get("direction") == "received":
                out["bytes"] += s.value
            elif s.name == "splitserve_kv_transfer_seconds_sum":
                out["seconds"] += s.value
    return out
