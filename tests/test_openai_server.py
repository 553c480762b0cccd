"""The OpenAI API end to end: the official `openai` client against a live
`splitserve serve --aggregated` (frontend + worker child processes) on loopback."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from live_server import start_serve

MAX_MODEL_LEN = 512
CHAT = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    srv = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("serve"), "--aggregated",
                      "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "tiny")
    yield srv
    try:
        # After everything this module did (finished, stopped, disconnected requests),
        # no KV block may still be held.
        assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0) == 0
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _greedy_chat(client, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=CHAT, **kw)


def test_models_lists_the_served_model_with_its_context_length(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == MAX_MODEL_LEN


def test_chat_non_stream_and_stream_agree_and_report_usage(client):
    full = _greedy_chat(client, max_tokens=12, extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(_greedy_chat(client, max_tokens=12, stream=True,
                               stream_options={"include_usage": True},
                               extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_non_stream_and_stream(client):
    kw = dict(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=10,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    # Token ids are a valid prompt too.
    ids = client.completions.create(model="tiny", prompt=[65, 66, 67], max_tokens=3,
                                    extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 3


def test_max_completion_tokens_and_default_max_tokens(client):
    r = _greedy_chat(client, max_completion_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    # Without a limit the rest of the context is the limit (as vLLM does).
    r = _greedy_chat(client, extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == MAX_MODEL_LEN and r.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(
            model="tiny", messages=CHAT, temperature=1.0, seed=seed, max_tokens=24,
            extra_body={"ignore_eos": True}).choices[0].message.content
    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_stop_strings_end_the_output_before_them(client):
    text = _greedy_chat(client, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    # A 3-character stop string from the middle of the greedy answer (printable, whole).
    start = next(i for i in range(5, len(text) - 3) if text[i:i + 3].isprintable()
                 and "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    expected = text[:text.find(stop)]
    r = _greedy_chat(client, max_tokens=40, stop=[stop, "never-occurs"], extra_body={"ignore_eos": True})
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    streamed = list(_greedy_chat(client, max_tokens=40, stop=stop, stream=True,
                                 extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_over_long_request_is_refused_with_vllms_wording(client):
    with pytest.raises(openai.BadRequestError) as e:
        _greedy_chat(client, max_tokens=MAX_MODEL_LEN)
    msg = e.value.body["message"]
    m = re.fullmatch(rf"This model's maximum context length is {MAX_MODEL_LEN} tokens\. However, you "
                     r"requested (\d+) tokens \((\d+) in the messages, (\d+) in the completion\)\. "
                     r"Please reduce the length of the messages or completion\.", msg)
    assert m and int(m[1]) == int(m[2]) + MAX_MODEL_LEN and int(m[3]) == MAX_MODEL_LEN
    assert e.value.status_code == 400 and e.value.body["type"] == "BadRequestError"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="x" * MAX_MODEL_LEN)


@pytest.mark.parametrize("kw, param", [
    ({"temperature": -1}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_invalid_parameters_are_400_naming_the_parameter(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _greedy_chat(client, **kw)
    assert e.value.body["param"] == param, e.value.body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=CHAT)
    assert e.value.body == {"message": "The model `gpt-5` does not exist.", "type": "NotFoundError",
                            "param": "model", "code": 404}


def test_invalid_json_is_400_in_openai_shape(server):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(server.base_url + path, content=b'{"model": "tiny", "messages": [',
                       headers={"content-type": "application/json"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "not valid JSON" in err["message"]


def test_32_concurrent_streams_all_complete(server):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        return chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused",
                                      max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(main()) == [("length", 8)] * 32


def test_client_disconnect_mid_stream_aborts_the_request_on_its_worker(server, client):
    stream = client.completions.create(model="tiny", prompt="A long story:", max_tokens=480,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    for _, chunk in zip(range(3), stream):
        pass
    request_id = chunk.id.removeprefix("cmpl-")
    assert server.worker_metric("splitserve_kv_blocks_in_use") > 0  # still generating
    stream.close()
    assert server.wait_worker_metric("splitserve_kv_blocks_in_use", 0) == 0
    assert server.wait_worker_metric("splitserve_num_requests_running", 0) == 0
    # The worker aborted it (it did not run on to max_tokens unheard).
    deadline = time.monotonic() + 15
    while f"request_id={request_id} aborted by its caller" not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    assert f"request_id={request_id} client disconnected" in server.log()


def test_metrics_count_requests_and_tokens(server):
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("splitserve_time_to_first_token_seconds_count", "splitserve_inter_token_latency_seconds_count",
                 "splitserve_e2e_request_latency_seconds_count", "splitserve_prompt_tokens_total",
                 "splitserve_generation_tokens_total"):
        assert server.frontend_metric(name) > 0, name
    assert 'splitserve_requests_total{status="200"}' in text
    assert 'splitserve_requests_total{status="400"}' in text
    assert 'splitserve_requests_total{status="404"}' in text
    worker = httpx.get(f"{server.worker_url}/metrics").text
    for name in ("splitserve_num_requests_running", "splitserve_num_requests_waiting",
                 "splitserve_kv_blocks_total", "splitserve_prefix_cache_queries_total",
                 "splitserve_prefix_cache_hits_total"):
        assert f"\n{name} " in worker, name
    assert server.worker_metric("splitserve_kv_blocks_total") > 0


def test_live_and_health(server):
    for url in (server.base_url, server.worker_url):
        assert httpx.get(f"{url}/live").status_code == 200
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    stats = httpx.get(f"{server.worker_url}/stats").json()
    assert stats["kv_blocks_total"] > 0 and stats["num_requests_running"] == 0
