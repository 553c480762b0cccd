"""`splitserve bench engine`: the engine against transformers on the same machine, same
run, same prompts.

- decode: the embedded SmolLM2, greedy, N new tokens per request, at 1 and 16 concurrent
  requests; transformers `generate` as the ceiling-to-beat (batch 1, and the same 16
  prompts as one left-padded batch).
- prefill: a tiny random Llama (131k positions, llama3 rope) at 16k and 64k tokens;
  splitserve's time to first token against one transformers forward (last logits only).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from splitserve.bench.report import machine, median, print_table, write_json
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.types import SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis briefly.", "Write a haiku about rain.",
    "What is 17 times 23?", "Name three primary colors.", "Why is the sky blue?",
    "Give me a synonym for happy.", "What does a CPU do?", "Describe a cat in one sentence.",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Translate 'thank you' into Spanish.", "What is machine learning?", "Who wrote Hamlet?",
    "What is the largest ocean?", "Suggest a name for a pet fish.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrent request counts")
    p.add_argument("--prefill-lengths", default="16384,65536", help="comma-separated prompt lengths")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians reported")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--json", help="write results to this path")


def run(args) -> int:
    results = {"machine": machine(), "decode": [], "prefill": []}
    print(f"machine: {results['machine']}")
    if not args.skip_decode:
        results["decode"] = bench_decode(args)
    if not args.skip_prefill:
        results["prefill"] = bench_prefill(args)
    write_json(args.json, results)
    return 0


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def bench_decode(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eng = LLMEngine(EngineConfig(max_num_seqs=64))
    tok = AutoTokenizer.from_pretrained(eng.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(eng.model_dir, dtype=torch.float32).eval()
    n = args.new_tokens
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    rows, out = [], []
    for conc in [int(c) for c in args.concurrency.split(",")]:
        prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           add_generation_prompt=True, tokenize=True) for i in range(conc)]
        prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
        eng.generate(prompts, params)  # warm-up (also fills the prefix cache equally for every repeat)
        t_ss = _timed(lambda: eng.generate(prompts, params), args.repeats)
        t_hf = _timed(lambda: _hf_generate(hf, tok, prompts, n), args.repeats)
        ss_tps, hf_tps = conc * n / t_ss, conc * n / t_hf
        rows.append([conc, ss_tps, hf_tps, ss_tps / hf_tps])
        out.append({"concurrency": conc, "new_tokens": n, "splitserve_tok_s": ss_tps,
                    "transformers_tok_s": hf_tps, "ratio": ss_tps / hf_tps})
    print_table(["concurrent", "splitserve tok/s", "transformers tok/s", "ratio"], rows,
                title=f"\ndecode: SmolLM2-135M greedy, {n} new tokens/request, medians of {args.repeats}")
    if len(out) > 1:
        base = out[0]["splitserve_tok_s"]
        for r in out[1:]:
            r["scaling_vs_first"] = r["splitserve_tok_s"] / base
            print(f"splitserve aggregate at {r['concurrency']} concurrent = "
                  f"{r['scaling_vs_first']:.2f}x its rate at {out[0]['concurrency']}")
    return out


def _hf_generate(hf, tok, prompts: list[list[int]], n: int) -> None:
    """Left-padded batch, exactly n new tokens each."""
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=pad)


def bench_prefill(args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from splitserve.model.tiny import make_tiny_llama

    lengths = [int(x) for x in args.prefill_lengths.split(",")]
    rows, out = [], []
    with tempfile.TemporaryDirectory() as d:
        model_dir = make_tiny_llama(d, max_position_embeddings=131072)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        longest = max(lengths)
        eng = LLMEngine(EngineConfig(model=str(model_dir), max_model_len=longest + 16,
                                     max_num_batched_tokens=longest, enable_prefix_caching=False))
        params = SamplingParams(max_tokens=1, temperature=0.0)
        g = torch.Generator().manual_seed(0)
        for n in lengths:
            prompt = torch.randint(0, 256, (n,), generator=g)

            def hf_forward():
                with torch.inference_mode():
                    hf(prompt[None], logits_to_keep=1)

            t_ss = _timed(lambda: eng.generate([prompt.tolist()], params), args.repeats)
            t_hf = _timed(hf_forward, args.repeats)
            rows.append([n, t_ss, t_hf, t_ss / t_hf])
            out.append({"tokens": n, "splitserve_s": t_ss, "transformers_s": t_hf, "ratio": t_ss / t_hf})
    print_table(["prompt tokens", "splitserve s", "transformers s", "ratio (lower is better)"], rows,
                title=f"\nprefill: tiny Llama (2 layers, 64 hidden, llama3 rope), medians of {args.repeats}")
    return out
