"""logprobs through the OpenAI API with the official SDK: chat `logprobs` + `top_logprobs`
and completions `logprobs`, streamed and whole, equal to transformers' log-softmax of the
model's logits; the same in `serve --aggregated` and `serve` (the prefill worker samples
the first token, and its logprobs travel with it); out-of-range values are a 400 naming
the parameter."""

from __future__ import annotations

import openai
import pytest
import torch

from golden import hf_model
from live_server import start_serve

ARGS = ("--max-model-len", "512", "--served-model-name", "tiny")
PROMPT_IDS = [1, 17, 99, 4, 230, 57, 8, 144, 3, 61]
CHAT = [{"role": "user", "content": "Name three rivers."}]


def _start(model_dir, workdir, *extra):
    return start_serve(model_dir, workdir, *ARGS, *extra)


@pytest.fixture(scope="module")
def aggregated(tiny_llama_dir, tmp_path_factory):
    srv = _start(tiny_llama_dir, tmp_path_factory.mktemp("lp-agg"), "--aggregated")
    yield srv
    assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0) == 0
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def disagg(tiny_llama_dir, tmp_path_factory):
    srv = _start(tiny_llama_dir, tmp_path_factory.mktemp("lp-disagg"))
    yield srv
    for url in srv.worker_urls:
        assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=url) == 0
    assert srv.stop() == 0


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)


def test_completion_logprobs_equal_transformers_log_softmax(aggregated, tiny_llama_dir):
    with _client(aggregated) as c:
        resp = c.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=8, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    # Greedy: the tokens are transformers' argmax, each token's logprob its top one.
    model = hf_model(str(tiny_llama_dir))
    ids = list(PROMPT_IDS)
    with torch.inference_mode():
        for i in range(8):
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            top = ref.topk(3)
            assert lp.token_logprobs[i] == pytest.approx(top.values[0].item(), abs=1e-4)
            # Keyed by token text: tokens that decode alike (byte tokens) share one key.
            for value in lp.top_logprobs[i].values():
                assert min(abs(value - v) for v in top.values.tolist()) < 1e-4
            ids.append(int(top.indices[0]))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def _close(a, b) -> bool:
    """Equal, floats to 1e-4: a prompt computed in other chunks (prefix cache, another
    worker) may move logits in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-4
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def _chat_logprobs(srv, stream: bool, **extra) -> list:
    args = dict(model="tiny", messages=CHAT, max_tokens=10, logprobs=True, top_logprobs=4,
                extra_body={"ignore_eos": True}, **extra)
    with _client(srv) as c:
        if not stream:
            return [e.model_dump() for e in c.chat.completions.create(**args).choices[0].logprobs.content]
        return [e.model_dump() for ch in c.chat.completions.create(stream=True, **args)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]


def _completion_logprobs(srv, stream: bool, **extra) -> list:
    args = dict(model="tiny", prompt=PROMPT_IDS, max_tokens=10, logprobs=2,
                extra_body={"ignore_eos": True}, **extra)
    with _client(srv) as c:
        if not stream:
            lp = c.completions.create(**args).choices[0].logprobs
            return list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        out = []
        for ch in c.completions.create(stream=True, **args):
            if ch.choices and ch.choices[0].logprobs:
                lp = ch.choices[0].logprobs
                out.extend(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        return out


def test_chat_logprobs_streamed_equal_whole_with_top_logprobs(aggregated):
    whole = _chat_logprobs(aggregated, stream=False, temperature=0)
    assert len(whole) == 10
    for e in whole:
        assert len(e["top_logprobs"]) == 4 and e["logprob"] <= 0
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])    # greedy
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
    assert _close(_chat_logprobs(aggregated, stream=True, temperature=0), whole)
    completion = _completion_logprobs(aggregated, stream=False, temperature=0)
    assert len(completion) == 10
    assert _close(_completion_logprobs(aggregated, stream=True, temperature=0), completion)


@pytest.mark.parametrize("body, param", [
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
])
def test_out_of_range_logprobs_are_a_400_naming_the_parameter(aggregated, body, param):
    import httpx

    path = "chat/completions" if "messages" in body else "completions"
    resp = httpx.post(f"{aggregated.base_url}/v1/{path}", json={"max_tokens": 2, **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_seeded_logprobs_are_identical_disaggregated_and_aggregated(aggregated, disagg):
    seeded = dict(temperature=0.8, seed=3)
    for stream in (False, True):
        assert _close(_chat_logprobs(disagg, stream, **seeded), _chat_logprobs(aggregated, stream, **seeded))
        assert _close(_completion_logprobs(disagg, stream, **seeded),
                      _completion_logprobs(aggregated, stream, **seeded))
