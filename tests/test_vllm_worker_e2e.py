"""`splitserve serve --engine vllm --aggregated`: vLLM's engine (the CPU build here)
behind splitserve's frontend and worker API, serving the embedded SmolLM2 in float32.
The official OpenAI client sees what it sees with our own engine; greedy output equals
transformers' token for token (as vLLM's does); refusals are 400s; the worker's KV events
name the prompt's blocks by the hashes the kv router computes; every KV block is free
again afterwards, and stopping serve leaves no vLLM process behind.

vLLM takes a minute or more to start on a loaded 2-core machine: one server per module."""

from __future__ import annotations

import json
import math
import time

import httpx
import openai
import pytest
import torch

from golden import hf_greedy, hf_model
from live_server import descendants, pid_alive, start_serve
from splitserve.kvtypes.block_hash import extend_block_hashes

# Slow (a vLLM worker under serve: a minute to start on 2 cores, minutes in all): run by
# `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

MODEL = "smol"
MAX_MODEL_LEN = 1024
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    srv = start_serve(smollm2_dir, tmp_path_factory.mktemp("serve-vllm"), "--engine", "vllm",
                      "--aggregated", "--dtype", "float32", "--enforce-eager",
                      "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "256MiB",
                      "--served-model-name", MODEL, timeout=900)
    processes = descendants(srv.process.pid)
    yield srv
    try:
        # After everything this module did (finished, streamed, disconnected requests),
        # vLLM holds no KV block and runs nothing.
        assert _wait_idle(srv.worker_url) == (0, 0)
    finally:
        assert srv.stop(timeout=60) == 0, srv.log()[-3000:]
        # serve, its worker and vLLM's engine processes under it: all gone.
        deadline = time.monotonic() + 30
        while (alive := [p for p in processes if pid_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"processes left behind: {alive}"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _wait_idle(worker_url: str, timeout: float = 30.0) -> tuple[int, int]:
    """(running requests, KV blocks in use) once both are 0, or as they are at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        s = httpx.get(f"{worker_url}/stats", timeout=10).json()
        got = (s["num_requests_running"], s["kv_blocks_in_use"])
        if got == (0, 0) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _generate(worker_url: str, request_id: str, prompt: list[int], **sampling) -> list[dict]:
    body = {"request_id": request_id, "prompt_token_ids": prompt, "sampling": sampling}
    resp = httpx.post(f"{worker_url}/generate", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines()]


def test_worker_describes_a_vllm_engine(server):
    info = httpx.get(f"{server.worker_url}/info", timeout=10).json()
    assert info["role"] == "both" and info["model_name"] == MODEL
    assert info["max_model_len"] == MAX_MODEL_LEN
    assert info["block_size"] == 128       # vLLM CPU's default (ours is 16)
    assert httpx.get(f"{server.worker_url}/health", timeout=10).status_code == 200
    assert server.worker_metric("splitserve_kv_blocks_total") > 0
    (worker,) = server.cluster()["workers"]
    assert worker["state"] == "ready"
    assert "engine ready: engine=vllm" in server.log()


def test_chat_and_completions_whole_and_streamed_agree(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                           temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == text
    completion = client.completions.create(model=MODEL, prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert completion.choices[0].text == streamed
    assert completion.choices[0].finish_reason == "length"


def test_greedy_output_equals_transformers_token_for_token(server, smollm2_dir, tokenizer):
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a small village,"]
    for i, text in enumerate(prompts):
        prompt = tokenizer(text)["input_ids"]
        chunks = _generate(server.worker_url, f"golden-{i}", prompt, max_tokens=16,
                           temperature=0, ignore_eos=True)
        got = [t for c in chunks for t in c.get("new_token_ids", [])]
        assert got == hf_greedy(smollm2_dir, prompt, 16), text


def test_logprobs_are_the_models_raw_log_probabilities(server, smollm2_dir, tokenizer):
    prompt = tokenizer("The capital of France is")["input_ids"]
    chunks = _generate(server.worker_url, "logprobs", prompt, max_tokens=1, temperature=0,
                       logprobs=3)
    (first,) = [lp for c in chunks for lp in c.get("logprobs") or []]
    with torch.inference_mode():
        logits = hf_model(str(smollm2_dir))(torch.tensor([prompt])).logits[0, -1]
    reference = torch.log_softmax(logits.float(), -1)
    top = torch.topk(reference, 3)
    assert [t for t, _ in first["top"]] == top.indices.tolist()
    assert first["token_id"] == top.indices[0].item()
    for (_, lp), ref in zip(first["top"], top.values.tolist()):
        assert math.isclose(lp, ref, abs_tol=1e-3)


def test_openai_logprobs_n_and_seed(client):
    lp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                        logprobs=True, top_logprobs=2)
    tokens = lp.choices[0].logprobs.content
    assert len(tokens) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob for t in tokens)

    def sampled():
        out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                        temperature=1.0, n=2, seed=1234)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sampled()
    assert len(first) == 2
    assert sampled() == first          # seeded: the same choices again


def test_invalid_requests_are_400(client, server):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=[100] * (MAX_MODEL_LEN + 1), max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**8], max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=0)
    # Straight to the worker: a token id outside the vocabulary, in vLLM's words.
    resp = httpx.post(f"{server.worker_url}/generate", timeout=60, json={
        "request_id": "oov", "prompt_token_ids": [10**8], "sampling": {"max_tokens": 1}})
    assert resp.status_code == 400 and "out of vocabulary" in resp.json()["message"]


def _leave_mid_stream(server, request_id: str, prompt: list[int]) -> None:
    """Straight to the worker: the caller (a frontend) closes its stream after two chunks;
    returns once the worker logged the abort."""
    body = {"request_id": request_id, "prompt_token_ids": prompt,
            "sampling": {"max_tokens": 400, "temperature": 0, "ignore_eos": True}}
    with httpx.stream("POST", f"{server.worker_url}/generate", json=body, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i == 1:
                break
    deadline = time.monotonic() + 10
    while f"request_id={request_id} aborted by its caller" not in server.log():
        assert time.monotonic() < deadline, "the worker did not abort the request"
        time.sleep(0.01)


def test_a_caller_leaving_mid_stream_aborts_the_request_in_vllm(server):
    _leave_mid_stream(server, "leaver", [100] * 20)
    assert _wait_idle(server.worker_url) == (0, 0)


def test_a_request_id_used_again_right_after_its_abort_gets_a_whole_answer(server):
    """vLLM's abort of the first runs while the second is added: it must not hit the
    second (a vLLM decode worker re-adds a request whose prefill worker refused it)."""
    _leave_mid_stream(server, "again", [101] * 20)
    chunks = _generate(server.worker_url, "again", [101] * 20, max_tokens=8, temperature=0,
                       ignore_eos=True)
    assert sum(len(c.get("new_token_ids", [])) for c in chunks) == 8
    assert chunks[-1]["finish_reason"] == "length"
    assert _wait_idle(server.worker_url) == (0, 0)


def test_kv_events_name_the_prompts_blocks_as_the_router_hashes_them(server):
    prompt = [(i * 37) % 5000 + 100 for i in range(300)]          # 2 full blocks of 128
    _generate(server.worker_url, "kv-events", prompt, max_tokens=1, temperature=0)
    expected = set(extend_block_hashes([], prompt, 128))
    # The events reach the worker asynchronously (vLLM's publisher, then ours): resubscribe
    # until the snapshot has them.
    deadline = time.monotonic() + 30
    while True:
        with httpx.stream("GET", f"{server.worker_url}/kv_events", timeout=30) as resp:
            assert resp.status_code == 200
            snapshot = json.loads(next(resp.iter_lines()))
        assert snapshot["events"][0] == {"type": "cleared"}
        stored = {h for e in snapshot["events"] if e["type"] == "stored" for h in e["block_hashes"]}
        if expected <= stored or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert expected <= stored


def test_structured_output_is_compiled_by_vllm(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a person as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    person = json.loads(out.choices[0].message.content)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    choice = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:",
                                       max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")


def test_a_forced_tool_call_round_trip(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"]}}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=ask, tools=tools, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    answer = client.chat.completions.create(
        model=MODEL, tools=tools, tool_choice="none", max_tokens=20, temperature=0,
        messages=[*ask, message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
