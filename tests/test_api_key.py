"""`--api-key`: the API (and /tokenize, /detokenize, /cluster) needs `Authorization:
Bearer <key>`, anything else is a 401 in OpenAI's shape that the `openai` SDK raises as
AuthenticationError; probes and metrics stay open; the key never shows in a log or on a
command line (`serve` hands it to the frontend in its environment)."""

from __future__ import annotations

import logging
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from live_server import child_pids
from procs import metric_value, spawn
from scripted_worker import MODEL, ScriptedWorker, frontend
from splitserve.cli.frontend_args import frontend_argv, frontend_config_from_args
from splitserve.cli.main import build_parser
from splitserve.frontend.config import FrontendConfig

KEY = "sk-test-7f3a9c"
CHAT = [{"role": "user", "content": "Hi"}]


def _sdk(base_url: str, key: str, http_client=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, http_client=http_client,
                         max_retries=0)


def _sample(text: str, sample: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(sample + " "))


def test_only_the_right_key_opens_the_api(tiny_llama_dir, caplog):
    tokens = AutoTokenizer.from_pretrained(tiny_llama_dir).encode("Hello!", add_special_tokens=False)
    caplog.set_level(logging.DEBUG)
    with frontend(ScriptedWorker(tiny_llama_dir, tokens), FrontendConfig(api_key=KEY)) as http:
        for key in ("wrong-key", KEY + "x", KEY[:-1]):
            with pytest.raises(openai.AuthenticationError) as e:
                _sdk(str(http.base_url), key, http).chat.completions.create(model=MODEL, messages=CHAT)
            assert e.value.status_code == 401
            assert e.value.body == {"message": "Invalid or missing API key: send Authorization: "
                                               "Bearer <key>", "type": "AuthenticationError",
                                    "param": None, "code": 401}
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
                             ("POST", "/detokenize"), ("GET", "/cluster")]:
            refused = http.request(method, path, json={"prompt": "hi", "tokens": [1]},
                                   headers={"x-request-id": "no-key-1"})
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.headers["x-request-id"] == "no-key-1"
        # Probes and metrics need no key.
        assert [http.get(p).status_code for p in ("/live", "/health", "/metrics")] == [200] * 3

        client = _sdk(str(http.base_url), KEY, http)
        full = client.chat.completions.create(model=MODEL, messages=CHAT)
        assert full.choices[0].message.content == "Hello!"
        chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello!"
        allowed = http.post("/tokenize", json={"prompt": "hi"}, headers={"authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200
        assert _sample(http.get("/metrics").text, 'splitserve_requests_total{status="401"}') == 8
    # Refusals are logged with their request id, never with a key.
    assert "request_id=no-key-1-" in caplog.text
    assert KEY[:8] not in caplog.text and "wrong-key" not in caplog.text


def test_the_key_comes_from_the_flag_or_the_environment_and_never_from_a_command_line(monkeypatch):
    def config(*argv):
        args = build_parser().parse_args(["serve", *argv])
        return args, frontend_config_from_args(args.parser, args)

    monkeypatch.delenv("SPLITSERVE_API_KEY", raising=False)
    assert config()[1].api_key is None
    args, cfg = config("--api-key", KEY, "--reasoning-parser", "deepseek_r1")
    assert cfg.api_key == KEY and KEY not in frontend_argv(args) and KEY not in repr(cfg)
    child = build_parser().parse_args(["frontend", "--discovery", "file:/d", *frontend_argv(args)])
    assert child.reasoning_parser == "deepseek_r1"
    monkeypatch.setenv("SPLITSERVE_API_KEY", KEY)
    assert config()[1].api_key == KEY
    for bad in ("", "ключ", "tab\tkey"):      # not a header value
        with pytest.raises(SystemExit):
            config("--api-key", bad)


def test_serve_hands_the_key_to_its_frontend_privately(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITSERVE_API_KEY", raising=False)
    proc, port, log_path = spawn(["serve", "--model", str(tiny_llama_dir), "--aggregated",
                                  "--max-model-len", "256", "--api-key", KEY], tmp_path, "serve", 180)
    base_url = f"http://127.0.0.1:{port}"
    try:
        frontend_pid = next(pid for pid in child_pids(proc.pid) if b"frontend" in _cmdline(pid))
        assert KEY.encode() not in _cmdline(frontend_pid)
        assert f"SPLITSERVE_API_KEY={KEY}".encode() in open(f"/proc/{frontend_pid}/environ", "rb").read()
        with pytest.raises(openai.AuthenticationError):
            _sdk(base_url, "wrong").completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        with _sdk(base_url, KEY) as client:
            model = client.models.list().data[0].id
            done = client.completions.create(model=model, prompt="hi", max_tokens=3,
                                             extra_body={"ignore_eos": True})
            assert done.usage.completion_tokens == 3
        workers = httpx.get(f"{base_url}/cluster", headers={"authorization": f"Bearer {KEY}"},
                            timeout=10).json()["workers"]
        deadline = time.monotonic() + 15
        while metric_value(f"{workers[0]['api_url']}/metrics", "splitserve_kv_blocks_in_use") != 0:
            assert time.monotonic() < deadline, "KV blocks still in use"
            time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert KEY not in log_path.read_text(errors="replace")


def _cmdline(pid: int) -> bytes:
    return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
