"""One answer whatever the deployment: the same OpenAI SDK requests (chat and completions,
logprobs with top_logprobs, n > 1, vLLM's sampling controls, a JSON schema, a forced
tool call; greedy and seeded), streamed and whole, give identical outputs and logprobs
from `serve --aggregated`, from a disaggregated cluster (1 prefill + 2 decode workers),
and streamed through that cluster while the decode worker serving the request is
SIGKILLed mid-stream (the request migrates to the other decode worker, which is then
replaced for the next case)."""

from __future__ import annotations

import signal
import time

import openai
import pytest

from live_server import start_serve
from workers import migration_cluster, start_worker

# Slow (the same requests through three clusters, one of them killed mid-stream: minutes
# on 2 cores): run by `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

ENGINE = ("--max-model-len", "1024", "--served-model-name", "tiny")
LONG = {"max_tokens": 300, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "user", "content": "Tell me about rivers."}]
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "rank": {"type": "integer", "minimum": 1},
    "tags": {"type": "array", "items": {"enum": ["north", "south", "east"]}, "maxItems": 3}},
    "required": ["city", "rank", "tags"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"]}}}]

# name -> (endpoint, request); the LONG ones run long enough to be migrated mid-stream.
CASES = {
    "chat greedy logprobs": ("chat", dict(messages=CHAT, temperature=0, logprobs=True,
                                          top_logprobs=3, **LONG)),
    "chat seeded n=2": ("chat", dict(messages=CHAT, temperature=0.9, seed=7, n=2, logprobs=True,
                                     top_logprobs=1, **LONG)),
    "completion seeded controls": ("completion", dict(
        prompt="Once upon a time", temperature=0.8, seed=11, presence_penalty=0.3,
        frequency_penalty=0.3, logit_bias={"17": 5}, logprobs=2, max_tokens=300,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.1, "min_tokens": 20})),
    "chat json_schema seeded": ("chat", dict(
        messages=CHAT, temperature=0.7, seed=3, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}})),
    "chat tool_choice required": ("chat", dict(messages=CHAT, temperature=0, max_tokens=120,
                                               tools=TOOLS, tool_choice="required")),
}
MIGRATED = [name for name, (_, req) in CASES.items() if req.get("max_tokens") == 300]


@pytest.fixture(scope="module")
def aggregated(tiny_llama_dir, tmp_path_factory):
    srv = start_serve(tiny_llama_dir, tmp_path_factory.mktemp("modes-agg"), "--aggregated", *ENGINE)
    yield srv
    try:
        assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0) == 0
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("modes-cluster")
    with migration_cluster(tiny_llama_dir, workdir, *ENGINE) as (frontend, procs, args):
        yield frontend, procs, (tiny_llama_dir, workdir, args)
        for proc in procs.values():
            if proc.process.poll() is None:
                assert proc.wait_metric("splitserve_kv_blocks_in_use", 0) == 0, proc.role


def _request(base_url: str, name: str, stream: bool, on_tokens=None) -> list[dict]:
    """Each choice's text, finish reason, logprobs (token, logprob, top alternatives) and
    tool calls, in index order; on_tokens(n) after each streamed chunk (n tokens so far)."""
    endpoint, req = CASES[name]
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        create = c.chat.completions.create if endpoint == "chat" else c.completions.create
        resp = create(model="tiny", stream=stream, **req)
        choices: dict[int, dict] = {}

        def choice(i: int) -> dict:
            return choices.setdefault(i, {"text": "", "reason": None, "logprobs": [], "calls": {}})

        if not stream:
            for ch in resp.choices:
                _add(choice(ch.index), endpoint, ch.message if endpoint == "chat" else ch, ch)
                choice(ch.index)["reason"] = ch.finish_reason
        else:
            for chunk in resp:
                for ch in chunk.choices:
                    _add(choice(ch.index), endpoint, ch.delta if endpoint == "chat" else ch, ch)
                    choice(ch.index)["reason"] = ch.finish_reason or choice(ch.index)["reason"]
                if on_tokens is not None:
                    on_tokens(sum(len(c["logprobs"]) for c in choices.values()))
    return [choices[i] for i in sorted(choices)]


def _add(out: dict, endpoint: str, part, ch) -> None:
    out["text"] += (part.content if endpoint == "chat" else part.text) or ""
    if endpoint == "chat":
        for k, call in enumerate(part.tool_calls or []):
            key = getattr(call, "index", k)
            name, args = out["calls"].get(key, ("", ""))
            out["calls"][key] = (name + (call.function.name or ""), args + (call.function.arguments or ""))
        for e in (ch.logprobs.content if ch.logprobs and ch.logprobs.content else []):
            out["logprobs"].append((e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]))
    elif ch.logprobs is not None:
        lp = ch.logprobs
        for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            out["logprobs"].append((tok, value, sorted(top.items())))


def _same(got: list[dict], want: list[dict]) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if (g["text"], g["reason"], g["calls"]) != (w["text"], w["reason"], w["calls"]):
            return False
        if [e[0] for e in g["logprobs"]] != [e[0] for e in w["logprobs"]]:
            return False
        for (_, gv, gtop), (_, wv, wtop) in zip(g["logprobs"], w["logprobs"]):
            if abs(gv - wv) > 1e-4 or [t for t, _ in gtop] != [t for t, _ in wtop] \
                    or any(abs(a - b) > 1e-4 for (_, a), (_, b) in zip(gtop, wtop)):
                return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_aggregated_and_disaggregated_give_the_same_answer_whole_and_streamed(aggregated, cluster, name):
    frontend = cluster[0]
    want = _request(aggregated.base_url, name, stream=False)
    assert all(c["text"] or c["calls"] for c in want)
    assert _same(_request(aggregated.base_url, name, stream=True), want)
    assert _same(_request(frontend.base_url, name, stream=False), want)
    assert _same(_request(frontend.base_url, name, stream=True), want)


@pytest.mark.parametrize("name", MIGRATED)
def test_a_stream_whose_decode_worker_is_killed_gives_the_same_answer(aggregated, cluster, name):
    frontend, procs, (model_dir, workdir, args) = cluster
    want = _request(aggregated.base_url, name, stream=False)
    killed: list[str] = []

    def kill_its_decode_worker(num_tokens: int) -> None:
        if killed or num_tokens < 20:
            return
        victim = next(n for n, w in procs.items() if n.startswith("decode") and w.process.poll() is None
                      and w.metric("splitserve_num_requests_running") > 0)
        procs[victim].process.send_signal(signal.SIGKILL)
        procs[victim].process.wait(10)
        killed.append(victim)

    migrations = frontend.log().count("migrating after")
    got = _request(frontend.base_url, name, stream=True, on_tokens=kill_its_decode_worker)
    assert killed and frontend.log().count("migrating after") > migrations
    assert _same(got, want)
    # A replacement, so that the next case again has a decode worker to migrate to.
    fresh = f"decode-{len(procs)}"
    procs[fresh] = start_worker("decode", model_dir, workdir, *args, name=fresh)
    deadline = time.monotonic() + 30
    while f"registered at {procs[fresh].url}" not in frontend.log():
        assert time.monotonic() < deadline, "the frontend never saw the replacement decode worker"
        time.sleep(0.1)
