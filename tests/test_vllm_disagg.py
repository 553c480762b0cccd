"""`splitserve serve --engine vllm`: one vLLM prefill worker and one vLLM decode worker
behind splitserve's frontend and kv router, the prompt's KV moving through
SplitserveConnector inside vLLM. The official OpenAI client sees what it sees with our
own engine; the KV is counted as transferred with no fallback; greedy output equals
transformers' (which equals aggregated vLLM's: test_vllm_worker_e2e) token for token;
every KV block is free again on both workers after each test. Last: the prefill worker
killed mid-transfer, and the request still answered by the decode worker's counted
recompute.

vLLM takes a minute or more to start on a loaded 2-core machine: one serve per module."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from golden import hf_greedy
from splitserve.cli.main import main
from procs import metric_value
from vllm_pd import (MODEL, STORY, generate, kill_prefill_mid_transfer, prefill_target,
                     vllm_pd_server, wait_all_free, wait_for)

pytest.importorskip("vllm")

# Slow (serve with a vLLM prefill and a vLLM decode worker, a kill and its restart:
# minutes on 2 cores): run by `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with vllm_pd_server(tmp_path_factory.mktemp("serve-vllm-pd")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _kv(server, name: str, role: str = "decode", **labels) -> float:
    (url,) = server.workers[role]
    return metric_value(f"{url}/metrics", name, **labels)


def _all_free(server) -> None:
    wait_all_free(*server.workers["prefill"], *server.workers["decode"])


def test_serve_runs_a_vllm_prefill_and_a_vllm_decode_worker(server):
    roles = {w["role"]: w for w in server.cluster()["workers"]}
    assert set(roles) == {"prefill", "decode"}
    assert all(w["state"] == "ready" for w in roles.values())
    target = prefill_target(server)
    assert roles["prefill"]["kv_address"] == f"{target['kv_host']}:{target['kv_port']}"
    assert "engine ready: engine=vllm" in server.log()


def test_openai_chat_and_completions_with_the_kv_transferred(server, client):
    ok0 = _kv(server, "splitserve_kv_transfers_total", outcome="ok")
    received0 = _kv(server, "splitserve_kv_transfer_bytes_total", direction="received")
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                           temperature=0,
                                           extra_headers={"x-request-id": "kv-counted"})
    text = whole.choices[0].message.content
    assert text and whole.usage.prompt_tokens > 5
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == text
    prompt = "Once upon a time, " + STORY
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                           temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert completion.choices[0].text == streamed and completion.choices[0].finish_reason == "length"
    # Each request's KV came from the prefill worker, counted on both sides, none recomputed.
    wait_for(lambda: _kv(server, "splitserve_kv_transfers_total", outcome="ok") >= ok0 + 4,
             "the decode worker to count 4 transfers")
    assert _kv(server, "splitserve_kv_transfers_total", outcome="ok") == ok0 + 4
    assert _kv(server, "splitserve_kv_transfer_bytes_total", direction="received") > received0
    assert _kv(server, "splitserve_kv_transfer_bytes_total", "prefill", direction="sent") > 0
    assert _kv(server, "splitserve_kv_transfer_fallbacks_total") == 0
    assert _kv(server, "splitserve_kv_transfer_seconds_count") >= 4
    # The frontend's line for the request says its whole prompt's KV arrived.
    line = r"request_id=kv-counted\S* done: .*KV of (\d+)/(\d+) prompt tokens transferred"
    done = wait_for(lambda: re.search(line, server.log()), "the frontend's line for the request")
    assert done[1] == done[2] == str(whole.usage.prompt_tokens), server.log()[-3000:]
    _all_free(server)


def test_greedy_output_equals_transformers_token_for_token(server, smollm2_dir, tokenizer):
    target = prefill_target(server)
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Write one sentence about the sea. " + STORY * 3]
    for i, text in enumerate(prompts):
        prompt = tokenizer(text)["input_ids"]
        status, tokens, _ = generate(server.worker_url, f"golden-{i}", prompt, target,
                                     max_tokens=16, temperature=0, ignore_eos=True)
        assert status == 200 and tokens == hf_greedy(smollm2_dir, prompt, 16), text
    assert _kv(server, "splitserve_kv_transfer_fallbacks_total") == 0
    _all_free(server)


def test_seeded_sampling_is_the_decode_workers_and_repeats(client, server):
    def sampled():
        out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                        temperature=1.0, seed=1234)
        return out.choices[0].text

    assert sampled() == sampled()
    _all_free(server)


def test_doctor_probes_the_vllm_workers_kv_session_and_bandwidth(server, capsys):
    """The handshake from the decode worker's vLLM rank to the prefill worker's, with the
    fingerprint its connector wrote, and a bandwidth probe of blocks of its size."""
    rc = main(["doctor", "--frontend", server.base_url, "--bandwidth-mb", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"], [(c["title"], c.get("details")) for c in report["checks"]
                                      if c["status"] != "ok"]
    by_id: dict[str, list[dict]] = {}
    for c in report["checks"]:
        by_id.setdefault(c["id"], []).append(c)
    [session] = by_id["kv_session"]
    assert session["probe"]["outcome"] == "ok", session
    [bw] = by_id["bandwidth"]
    assert bw["bandwidth"]["bytes"] >= 15 << 20 and bw["bandwidth"]["bytes_per_s"] > 0
    _all_free(server)


def test_prefill_killed_mid_transfer_is_a_counted_recompute(server, smollm2_dir, tokenizer):
    """Last in the module: it kills the prefill worker (serve restarts it)."""
    def prompt(rid: str) -> list[int]:                                   # ~1700 tokens
        return tokenizer(f"A very long night, {rid}. " + STORY * 40)["input_ids"]

    fallbacks0 = _kv(server, "splitserve_kv_transfer_fallbacks_total")
    # P's first blocks are out (P sends them per step, 32 tokens a step): P dies mid-prefill.
    rid, (status, tokens, _) = kill_prefill_mid_transfer(server, lambda rid: generate(
        server.worker_url, rid, prompt(rid), prefill_target(server), max_tokens=8,
        temperature=0, ignore_eos=True))
    assert status == 200 and tokens == hf_greedy(smollm2_dir, prompt(rid), 8)
    # Counted once, as the decode worker's vLLM reports its connector's stats (per step).
    wait_for(lambda: _kv(server, "splitserve_kv_transfer_fallbacks_total") > fallbacks0,
             "the decode worker to count the fallback", detail=lambda: server.log()[-6000:])
    assert _kv(server, "splitserve_kv_transfer_fallbacks_total") == fallbacks0 + 1
    # The decode side's vLLM names the request and what it reused.
    m = re.findall(rf"request_id={rid}\S* transfer \S+: KV load failed \((\w+)\).*recomputing "
                   r"the (\d+) blocks that did not arrive, reusing (\d+) verified", server.log())
    assert m and int(m[-1][1]) > 0, server.log()[-4000:]
    # The decode worker's /incidents names it (by transfer id: the request id and a suffix),
    # the reason, the prefill worker's KV address and the policy, as doctor shows it.
    incidents = httpx.get(f"{server.worker_url}/incidents", timeout=10).json()
    fallback = [i for i in incidents["recent"]
                if i["kind"] == "fallback" and i["request_id"].startswith(f"{rid}.")]
    assert len(fallback) == 1 and fallback[0]["reason"] == m[-1][0], incidents
    assert fallback[0]["detail"].endswith("policy recompute") and fallback[0]["peer"]
    wait_all_free(server.worker_url)
