"""Reasoning output (`--reasoning-parser`): the text inside <think>…</think> reaches the
client as reasoning_content, the rest as content, however the stream splits the tags,
and usage counts the reasoning tokens. Unit tests of the splitter on text and token
streams, then the official `openai` SDK against the real frontend over a worker whose
token stream is scripted (a tiny model cannot be made to write these tags)."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from live_server import start_serve
from scripted_worker import MODEL, ScriptedWorker, frontend
from splitserve.discovery import StaticDiscovery, StaticDiscoveryConfig
from splitserve.frontend.app import create_app
from splitserve.frontend.config import FrontendConfig
from splitserve.frontend.detokenizer import IncrementalDetokenizer
from splitserve.frontend.reasoning import ReasoningSplitter, prompt_opens_think
from splitserve.worker import protocol as p

CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _split(parser: str, pieces: list[str], prompt_opened: bool = False) -> tuple[str, str]:
    s = ReasoningSplitter(parser, prompt_opened)
    outs = [s.feed(piece) for piece in pieces] + [s.flush()]
    return "".join(o.reasoning for o in outs), "".join(o.content for o in outs)


def _splits(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and cut in two at every position."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


@pytest.mark.parametrize("parser, prompt_opened, text, expected", [
    # R1: the template opened <think>; the model writes only the closing tag.
    ("deepseek_r1", False, "Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("deepseek_r1", False, "<think>Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("deepseek_r1", False, "cut off before the end", ("cut off before the end", "")),
    ("deepseek_r1", False, "</think>at once", ("", "at once")),
    ("deepseek_r1", False, "done</think>", ("done", "")),
    ("deepseek_r1", False, "a</think>b</think>c<think>", ("a", "b</think>c<think>")),
    ("deepseek_r1", False, "ends in </thi", ("ends in </thi", "")),
    ("deepseek_r1", False, "<thi", ("<thi", "")),
    ("deepseek_r1", False, "<think>", ("", "")),
    # Only a leading <think> opens: later it is text.
    ("deepseek_r1", False, "x<think>y</think>z", ("x<think>y", "z")),
    # Qwen3: the model opens <think> itself, or writes no tags at all (thinking off).
    ("qwen3", False, "<think>hmm</think>ok", ("hmm", "ok")),
    ("qwen3", False, "just an answer", ("", "just an answer")),
    ("qwen3", False, "an answer</think>with a tag", ("", "an answer</think>with a tag")),
    ("qwen3", False, "<think>cut off", ("cut off", "")),
    ("qwen3", False, "<th", ("", "<th")),
    ("qwen3", False, "<think>", ("", "")),
    # Qwen3 with a template that opens <think> in the prompt: as R1.
    ("qwen3", True, "hmm</think>ok", ("hmm", "ok")),
])
def test_the_split_is_the_same_however_the_text_arrives(parser, prompt_opened, text, expected):
    for pieces in _splits(text):
        assert _split(parser, pieces, prompt_opened) == expected, pieces


def test_held_back_text_is_released_as_soon_as_it_cannot_be_a_tag():
    s = ReasoningSplitter("deepseek_r1")
    assert (s.feed("a </").reasoning, s.feed("b").reasoning) == ("a ", "</b")
    assert s.feed("</think").reasoning == ""
    out = s.feed("> yes")
    assert (out.reasoning, out.content) == ("", " yes")
    assert (s.feed("</think>").content, s.flush().content) == ("</think>", "")


def test_reasoning_tokens_count_the_tokens_up_to_the_closing_tag(tokenizer):
    reasoning, answer = "I add 2 and 2.", " It is 4."
    ids = tokenizer.encode(reasoning + "</think>" + answer, add_special_tokens=False)
    n_reasoning = len(tokenizer.encode(reasoning + "</think>", add_special_tokens=False))
    assert n_reasoning > len("</think>")     # the tags span several tokens here
    detok, s = IncrementalDetokenizer(tokenizer), ReasoningSplitter("deepseek_r1")
    outs = [s.feed(detok.push([t]), i + 1) for i, t in enumerate(ids)] + [s.flush(len(ids))]
    assert ("".join(o.reasoning for o in outs), "".join(o.content for o in outs)) == (reasoning, answer)
    assert s.reasoning_tokens == n_reasoning
    # Unfinished reasoning: every token is a reasoning token; no reasoning: none is.
    unfinished = ReasoningSplitter("deepseek_r1")
    unfinished.feed("still thinking", 5)
    unfinished.flush(6)
    assert unfinished.reasoning_tokens == 6
    plain = ReasoningSplitter("qwen3")
    plain.feed("an answer", 3)
    plain.flush(3)
    assert plain.reasoning_tokens == 0


def test_a_prompt_that_opens_think_starts_qwen3_in_reasoning(tokenizer):
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)
    assert prompt_opens_think(tokenizer, ids("<|im_start|>assistant\n<think>\n"))
    assert not prompt_opens_think(tokenizer, ids("<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    assert not prompt_opens_think(tokenizer, ids("<|im_start|>assistant\n"))


# --- end to end: the openai SDK, the real frontend, a scripted token stream -------------

def _sdk(http) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http,
                         max_retries=0)


def _served(tiny_llama_dir, tokenizer, output: str, parser: str | None):
    worker = ScriptedWorker(tiny_llama_dir, tokenizer.encode(output, add_special_tokens=False))
    return frontend(worker, FrontendConfig(reasoning_parser=parser))


def _stream(client, **kw):
    kw.setdefault("model", MODEL)
    chunks = list(client.chat.completions.create(messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return deltas, chunks[-1].usage


@pytest.mark.parametrize("parser, output, reasoning, content", [
    ("deepseek_r1", "2 and 2 make 4.</think>\n\nThe answer is 4.", "2 and 2 make 4.", "\n\nThe answer is 4."),
    ("qwen3", "<think>Adding.</think>4", "Adding.", "4"),
])
def test_sdk_gets_reasoning_content_apart_from_content(tiny_llama_dir, tokenizer, parser, output,
                                                       reasoning, content):
    closing = output.index("</think>") + len("</think>")
    n_reasoning = len(tokenizer.encode(output[:closing], add_special_tokens=False))
    with _served(tiny_llama_dir, tokenizer, output, parser) as http:
        client = _sdk(http)
        full = client.chat.completions.create(model=MODEL, messages=CHAT)
        message = full.choices[0].message
        assert (message.reasoning_content, message.content) == (reasoning, content)
        assert full.usage.completion_tokens_details.reasoning_tokens == n_reasoning
        assert full.usage.completion_tokens == len(tokenizer.encode(output, add_special_tokens=False))

        # Streamed one token per chunk: the tags span several chunks, yet no piece of
        # them reaches the client, and every reasoning delta comes before the content.
        deltas, usage = _stream(client)
        kinds = [("r" if getattr(d, "reasoning_content", None) else "") + ("c" if d.content else "")
                 for d in deltas]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
        assert "".join(d.content or "" for d in deltas) == content
        assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c"), kinds
        assert usage.model_dump() == full.usage.model_dump()


def test_r1_output_cut_off_while_reasoning_is_all_reasoning(tiny_llama_dir, tokenizer):
    with _served(tiny_llama_dir, tokenizer, "Hmm, let me think about this.</think>4",
                 "deepseek_r1") as http:
        full = _sdk(http).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
    assert full.choices[0].finish_reason == "length"
    message = full.choices[0].message
    assert (message.reasoning_content, message.content) == ("Hmm, let", None)
    assert full.usage.completion_tokens_details.reasoning_tokens == 8


def test_qwen3_output_without_tags_is_all_content(tiny_llama_dir, tokenizer):
    with _served(tiny_llama_dir, tokenizer, "Four.", "qwen3") as http:
        client = _sdk(http)
        message = client.chat.completions.create(model=MODEL, messages=CHAT).choices[0].message
        deltas, usage = _stream(client)
    assert (message.reasoning_content, message.content) == (None, "Four.")
    assert not any(getattr(d, "reasoning_content", None) for d in deltas)
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_without_a_parser_or_on_completions_the_tags_are_plain_text(tiny_llama_dir, tokenizer):
    output = "<think>hmm</think>ok"
    with _served(tiny_llama_dir, tokenizer, output, None) as http:
        full = _sdk(http).chat.completions.create(model=MODEL, messages=CHAT)
    assert full.choices[0].message.content == output
    assert getattr(full.choices[0].message, "reasoning_content", None) is None
    assert full.usage.completion_tokens_details is None
    with _served(tiny_llama_dir, tokenizer, output, "deepseek_r1") as http:
        text = _sdk(http).completions.create(model=MODEL, prompt="2 + 2 =", max_tokens=50)
    assert text.choices[0].text == output


@pytest.mark.parametrize("mode", [[], ["--aggregated"]], ids=["disaggregated", "aggregated"])
def test_a_real_stream_through_serve_is_split_as_its_plain_text_would_be(tiny_llama_dir, tmp_path, mode):
    """Real workers: the tiny model writes no tags, so under R1's rule its whole greedy
    answer is reasoning; the same prompt's tokens through /v1/completions (never parsed)
    say what that text is."""
    srv = start_serve(tiny_llama_dir, tmp_path, *mode, "--max-model-len", "256",
                      "--reasoning-parser", "deepseek_r1")
    try:
        prompt = httpx.post(f"{srv.base_url}/tokenize", json={"messages": CHAT}, timeout=30).json()["tokens"]
        with openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0) as client:
            model = client.models.list().data[0].id
            greedy = dict(model=model, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
            text = client.completions.create(prompt=prompt, **greedy).choices[0].text
            full = client.chat.completions.create(messages=CHAT, **greedy)
            deltas, usage = _stream(client, **greedy)
        assert (full.choices[0].message.reasoning_content, full.choices[0].message.content) == (text, None)
        assert full.usage.completion_tokens_details.reasoning_tokens == 12
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == text
        assert not any(d.content for d in deltas) and usage.model_dump() == full.usage.model_dump()
        for url in srv.worker_urls:
            assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=url) == 0
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


class BreakingWorkers(ScriptedWorker):
    """Workers w0 and w1 serving one script; a request's first attempt breaks its stream
    after `breaks_after` tokens (the worker died), a migrated attempt (prompt + the tokens
    so far) continues the script where that prompt left it."""

    def __init__(self, model_dir, tokens: list[int], breaks_after: int):
        super().__init__(model_dir, tokens)
        self.breaks_after = breaks_after
        self.hosts: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/generate":
            return super().__call__(request)
        body = json.loads(request.content)
        self.received.append(body)
        self.hosts.append(request.url.host)
        done = len(body["prompt_token_ids"]) - len(self.received[0]["prompt_token_ids"])
        todo = self.tokens[done:]
        breaks = None if re.search(r"-m\d+$", body["request_id"]) else self.breaks_after

        async def stream():
            for i, token in enumerate(todo):
                if i == breaks:
                    raise httpx.RemoteProtocolError("peer closed connection without sending "
                                                    "complete message body")
                yield p.encode_line(p.GenerateChunk(
                    new_token_ids=[token], finish_reason="stop" if i == len(todo) - 1 else None))
        return httpx.Response(200, content=stream())


def test_a_stream_migrated_inside_the_closing_tag_is_split_as_one_stream(tiny_llama_dir, tokenizer):
    reasoning, content = "2 and 2 make 4.", " It is 4."
    tokens = tokenizer.encode(reasoning + "</think>" + content, add_special_tokens=False)
    # The worker dies after "...4.</th": the tag's two halves come from two workers.
    worker = BreakingWorkers(tiny_llama_dir, tokens, breaks_after=len(reasoning) + 4)
    app = create_app(StaticDiscovery(StaticDiscoveryConfig(("http://w0:1", "http://w1:1"))),
                     FrontendConfig(reasoning_parser="deepseek_r1"), transport=httpx.MockTransport(worker))
    with TestClient(app) as http:
        deadline = time.monotonic() + 60
        while (http.get("/health").status_code != 200       # the tokenizer loaded too
               or [w["state"] for w in http.get("/cluster").json()["workers"]] != ["ready"] * 2):
            assert time.monotonic() < deadline, http.get("/cluster").json()
            time.sleep(0.05)
        client = _sdk(http)
        full = client.chat.completions.create(model=MODEL, messages=CHAT)
        deltas, usage = _stream(client)
    message = full.choices[0].message
    assert (message.reasoning_content, message.content) == (reasoning, content)
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    assert usage.completion_tokens == len(tokens) and usage.model_dump() == full.usage.model_dump()
    assert usage.completion_tokens_details.reasoning_tokens == len(reasoning) + len("</think>")
    # Each request moved once, to the other worker.
    assert [r["request_id"].endswith("-m1") for r in worker.received] == [False, True] * 2
    assert worker.hosts[0] != worker.hosts[1] and worker.hosts[2] != worker.hosts[3]
