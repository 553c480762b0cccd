"""POST /tokenize and /detokenize as vLLM has them: a prompt or chat messages become the
very tokens a completion would send to the worker, token ids become text, and bad input
is a 400 naming the parameter."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from scripted_worker import MAX_MODEL_LEN, MODEL, ScriptedWorker, frontend

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model with a tokenizer that adds BOS, as Llama's does: add_special_tokens
    then makes a difference."""
    path = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_llama_dir, path)
    AutoTokenizer.from_pretrained(tiny_llama_dir, add_bos_token=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def served(model_dir, tokenizer):
    worker = ScriptedWorker(model_dir, tokenizer.encode("ok", add_special_tokens=False))
    with frontend(worker) as http:
        yield http, worker


def test_a_prompt_is_tokenized_as_completions_tokenize_it(served, tokenizer):
    http, worker = served
    got = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    ids = tokenizer.encode("Hello world")
    assert ids[0] == tokenizer.bos_token_id
    assert got == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": None}
    http.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 1})
    assert worker.received[-1]["prompt_token_ids"] == ids

    bare = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False,
                                        "return_token_strs": True}).json()
    assert bare["tokens"] == ids[1:]
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(ids[1:])


def test_messages_are_tokenized_as_the_chat_completion_prompt(served, tokenizer):
    http, worker = served
    got = http.post("/tokenize", json={"messages": CHAT}).json()
    http.post("/v1/chat/completions", json={"messages": CHAT})
    assert got["tokens"] == worker.received[-1]["prompt_token_ids"]
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == MAX_MODEL_LEN

    # The template writes its own special tokens: add_special_tokens adds BOS on top.
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    without = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert without["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert without["count"] < got["count"]
    bos = http.post("/tokenize", json={"messages": CHAT, "add_special_tokens": True}).json()
    assert bos["tokens"] == [tokenizer.bos_token_id] + got["tokens"]


def test_detokenize_turns_tokens_back_into_text(served, tokenizer):
    http, _ = served
    ids = http.post("/tokenize", json={"prompt": "Grüße, 世界"}).json()["tokens"]
    got = http.post("/detokenize", json={"model": MODEL, "tokens": ids})
    # As vLLM: special tokens (here BOS) are kept.
    assert got.status_code == 200 and got.json() == {"prompt": tokenizer.decode(ids)}
    assert got.json()["prompt"].endswith("Grüße, 世界")


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 7}, 400, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
])
def test_bad_input_is_refused_naming_the_parameter(served, path, body, status, param):
    http, _ = served
    got = http.post(path, json=body)
    assert got.status_code == status, got.text
    assert got.json()["error"]["param"] == param and got.json()["error"]["code"] == status


def test_a_body_that_is_not_json_is_a_400(served):
    http, _ = served
    got = http.post("/tokenize", content=b"{not json", headers={"content-type": "application/json"})
    assert got.status_code == 400 and "not valid JSON" in got.json()["error"]["message"]
