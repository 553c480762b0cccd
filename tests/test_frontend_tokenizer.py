"""A frontend needs no model files on its host: it gets the tokenizer and chat template
from a worker (GET /tokenizer, behind the deployment's secret), or from --tokenizer DIR."""

from __future__ import annotations

import shutil

import httpx
import msgspec
import pytest
from transformers import AutoTokenizer

from live_server import start_frontend
from scripted_worker import ScriptedWorker, frontend
from splitserve.frontend.config import FrontendConfig
from splitserve.worker.config import SECRET_ENV
from splitserve.worker.tokenizer_files import (TOKENIZER_FILE_NAMES, TokenizerBundle, TokenizerFileError,
                                               check_bundle, read_tokenizer_files)
from workers import start_worker

MESSAGES = [{"role": "user", "content": "hello there"}]


def test_a_frontend_whose_host_lacks_the_model_files_serves_chat(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "tokenizer-test-secret")     # both processes get it
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    worker = start_worker("both", model, tmp_path)
    fe = None
    try:
        # The worker loaded the model; now the directory its /info names exists nowhere
        # on this host, as on a frontend host without the model.
        model.rename(tmp_path / "moved-away")
        assert worker.info.model_dir == str(model) and not model.exists()
        # The tokenizer route is behind the secret like every worker route but the probes.
        assert httpx.get(f"{worker.url}/tokenizer").status_code == 401
        bundle = msgspec.json.decode(httpx.get(f"{worker.url}/tokenizer", headers=worker.auth).content,
                                     type=TokenizerBundle)
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(bundle.files) <= set(TOKENIZER_FILE_NAMES)

        fe = start_frontend(tmp_path, f"static:{worker.url}")
        fe.wait_health(200, timeout=90)
        r = httpx.post(f"{fe.base_url}/v1/chat/completions", timeout=120, json={
            "model": worker.info.model_name, "messages": MESSAGES, "max_tokens": 4,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 4
        # The prompt went through the model's own chat template.
        local = AutoTokenizer.from_pretrained(tiny_llama_dir)
        text = local.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        assert body["usage"]["prompt_tokens"] == len(local.encode(text, add_special_tokens=False))
        assert "tokenizer loaded from worker" in fe.log()
        assert worker.wait_metric("splitserve_kv_blocks_in_use", 0) == 0
    finally:
        if fe is not None:
            fe.stop()
        worker.stop()


def test_a_tokenizer_directory_given_to_the_frontend_is_used_instead(tiny_llama_dir, tmp_path):
    # This worker's model directory holds no tokenizer: only --tokenizer can serve.
    hi = AutoTokenizer.from_pretrained(tiny_llama_dir).encode("hi", add_special_tokens=False)
    worker = ScriptedWorker(tmp_path / "no-such-model", tokens=hi)
    with frontend(worker, FrontendConfig(tokenizer=str(tiny_llama_dir))) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                    "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "hi"


def test_only_tokenizer_files_are_read_or_written(tiny_llama_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(TokenizerFileError, match="has no tokenizer"):
        read_tokenizer_files(tmp_path)
    bundle = read_tokenizer_files(tiny_llama_dir)
    assert "model.safetensors" not in bundle.files and "config.json" in bundle.files
    for name in ("../escape.json", "model.safetensors", "/etc/passwd"):
        with pytest.raises(TokenizerFileError, match="unexpected tokenizer file names"):
            check_bundle(TokenizerBundle({**bundle.files, name: b"x"}))
