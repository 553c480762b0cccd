"""vLLM's sampling controls through the OpenAI API with the official SDK: penalties,
logit_bias, min_tokens give the same text in `serve --aggregated` and `serve` (the
prefill worker samples the first token under the same controls); out-of-range values
are a 400 naming the parameter."""

from __future__ import annotations

import httpx
import openai
import pytest

from live_server import start_serve

ARGS = ("--max-model-len", "512", "--served-model-name", "tiny")
CHAT = [{"role": "user", "content": "Write a list of fruits."}]
PROMPT = "One, two, three, four,"


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    agg = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("ctl-agg"), *ARGS, "--aggregated")
    disagg = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("ctl-disagg"), *ARGS)
    yield agg, disagg
    for srv in (agg, disagg):
        for url in srv.worker_urls:
            assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=url) == 0
        assert srv.stop() == 0


def _texts(srv, **controls) -> list[str]:
    with openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0) as c:
        chat = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, **controls)
        done = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, **controls)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=20, stream=True, **controls))
    return [chat.choices[0].message.content, done.choices[0].text, streamed]


CONTROLS = [
    dict(temperature=0, frequency_penalty=1.5, presence_penalty=0.5,
         extra_body={"repetition_penalty": 1.3, "ignore_eos": True}),
    dict(temperature=0.8, seed=11, logit_bias={"5": 4.0, "9": -100},
         extra_body={"min_tokens": 5}),
]


@pytest.mark.parametrize("controls", CONTROLS)
def test_controls_give_the_same_text_aggregated_and_disaggregated(servers, controls):
    agg, disagg = servers
    ours = _texts(disagg, **controls)
    assert ours == _texts(agg, **controls)
    assert ours[1] == ours[2]
    plain = _texts(agg, **{k: v for k, v in controls.items() if k in ("temperature", "seed")},
                   extra_body={"ignore_eos": True} if "ignore_eos" in controls.get("extra_body", {}) else {})
    assert ours != plain


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0),
    ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 150}), ("logit_bias", {"99999999": 1}),
    ("min_tokens", 50), ("min_tokens", -1),
])
def test_out_of_range_controls_are_a_400_naming_the_parameter(servers, field, value):
    agg, _ = servers
    resp = httpx.post(f"{agg.base_url}/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 20, field: value})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field
