"""`splitserve bench serve`'s client counts what a server really produced: exactly the
requested tokens per request, first-token time before the end, failures as failures."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from live_server import start_serve
from splitserve.bench.serve_client import Scenario, random_prompts, run_scenario


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    srv = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("bench-serve"), "--aggregated")
    yield srv
    srv.stop()


def test_every_request_is_timed_token_by_token(server):
    scenario = Scenario("smoke", concurrency=3, num_requests=5, input_len=40, output_len=7)
    prompts = random_prompts(scenario, vocab_size=256, seed=0)
    assert all(len(p) == 40 for p in prompts) and len({tuple(p) for p in prompts}) == 5
    result = asyncio.run(run_scenario(server.base_url, _model(server), scenario, prompts))
    summary = result.summary()
    assert summary["ok"] == 5 and summary["failed"] == 0, summary
    for t in result.timings:
        assert t.output_tokens == 7 and 0 < t.ttft_s <= t.latency_s
    assert summary["output_tok_s"] == pytest.approx(35 / result.wall_s)
    assert summary["ttft_p50_ms"] <= summary["ttft_p99_ms"]


def test_refused_requests_are_counted_as_failures(server):
    scenario = Scenario("too long", concurrency=1, num_requests=2, input_len=10**5, output_len=4)
    result = asyncio.run(run_scenario(server.base_url, _model(server), scenario,
                                      random_prompts(scenario, vocab_size=256, seed=0)))
    summary = result.summary()
    assert summary["ok"] == 0 and summary["failed"] == 2 and summary["errors"] == ["HTTP 400"]


def _model(server) -> str:
    return httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
