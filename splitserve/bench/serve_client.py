"""The load generator of `splitserve bench serve`: closed-loop clients that stream
completions from an OpenAI-compatible server and time every token.

Prompts are lists of random token ids (the same ones for every server), so each server
receives exactly `input_len` prompt tokens whatever its tokenizer would do with text;
`ignore_eos` makes every request produce exactly `output_len` tokens. Both are how
`vllm bench serve --dataset-name random` loads a server, so the two clients' figures
compare.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    num_requests: int
    input_len: int
    output_len: int

    def __post_init__(self) -> None:
        if min(self.concurrency, self.num_requests, self.input_len, self.output_len) < 1:
            raise ValueError(f"scenario {self.name!r}: every count must be at least 1")


@dataclass
class RequestTiming:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class ScenarioResult:
    scenario: Scenario
    wall_s: float
    timings: list[RequestTiming] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [t for t in self.timings if t.ok]
        ttft = sorted(t.ttft_s * 1e3 for t in ok)
        tpot = sorted(t.tpot_s * 1e3 for t in ok if t.tpot_s is not None)
        out_tokens = sum(t.output_tokens for t in ok)
        return {"scenario": self.scenario.name, "ok": len(ok), "failed": len(self.timings) - len(ok),
                "errors": sorted({t.error for t in self.timings if not t.ok})[:3],
                "wall_s": self.wall_s, "output_tok_s": out_tokens / self.wall_s if self.wall_s else 0.0,
                "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
                "tpot_p50_ms": _pct(tpot, 50), "tpot_p99_ms": _pct(tpot, 99)}


def _pct(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def random_prompts(scenario: Scenario, vocab_size: int, seed: int) -> list[list[int]]:
    """Token ids away from both ends of the vocabulary, where the special tokens live."""
    rng = random.Random(f"{seed}:{scenario.name}")
    lo, hi = min(1000, vocab_size // 4), max(vocab_size - 1000, vocab_size * 3 // 4)
    return [[rng.randrange(lo, hi) for _ in range(scenario.input_len)]
            for _ in range(scenario.num_requests)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
               output_len: int, headers: dict) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return RequestTiming(False, error=f"HTTP {resp.status_code}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                if any(c.get("text") for c in event.get("choices") or ()):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
    except (httpx.HTTPError, ValueError) as e:
        return RequestTiming(False, error=type(e).__name__)
    latency = time.perf_counter() - t0
    if first is None:
        return RequestTiming(False, error="no tokens")
    return RequestTiming(True, first, latency, usage_tokens if usage_tokens is not None else chunks)


async def run_scenario(base_url: str, model: str, scenario: Scenario, prompts: list[list[int]],
                       api_key: str | None = None, timeout_s: float = 1800.0) -> ScenarioResult:
    """`concurrency` clients, each sending its next request as soon as the previous ends."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    timings: list[RequestTiming] = []
    limits = httpx.Limits(max_connections=scenario.concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                timings.append(await _one(client, url, model, prompt, scenario.output_len, headers))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
        wall = time.perf_counter() - t0
    return ScenarioResult(scenario, wall, timings)
