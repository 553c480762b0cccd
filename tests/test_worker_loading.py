"""Start-up and failure states: while the model loads, the worker and the frontend answer
/live with 200 and /health and the API with 503 and a reason; a failed load is fatal."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from splitserve.cli.http_server import HttpServer
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.discovery import parse_discovery
from splitserve.frontend.app import create_app as create_frontend
from splitserve.worker.app import create_app as create_worker
from splitserve.worker.async_engine import AsyncEngine, EngineState
from splitserve.worker.config import WorkerConfig


class ThreadServer:
    """An HttpServer on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        self.server = HttpServer(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait(lambda: httpx.get(f"{self.url}/live").status_code == 200)

    def stop(self):
        self.server.request_exit()
        self.thread.join(15)


def _wait(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_503_with_a_reason_while_the_model_loads_then_ready(tiny_llama_dir):
    release = threading.Event()
    fatal: list[str] = []

    def slow_load():
        release.wait(60)
        return LLMEngine(EngineConfig(model=str(tiny_llama_dir), served_model_name="tiny", max_model_len=256))

    worker = ThreadServer(create_worker(AsyncEngine(slow_load, fatal.append), WorkerConfig(), "both-0"))
    frontend = ThreadServer(create_frontend(parse_discovery(f"static:{worker.url}")))
    try:
        r = httpx.get(f"{worker.url}/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading", "reason": "the model is loading"})
        assert httpx.post(f"{worker.url}/generate", content=b"{}").status_code == 503
        assert httpx.get(f"{frontend.url}/live").status_code == 200
        _wait(lambda: "loading" in httpx.get(f"{frontend.url}/health").json()["reason"])
        assert httpx.get(f"{frontend.url}/health").status_code == 503

        client = openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503
        assert e.value.body["type"] == "ServiceUnavailableError" and "loading" in e.value.body["message"]
        assert httpx.get(f"{frontend.url}/v1/models").status_code == 503

        release.set()
        _wait(lambda: httpx.get(f"{frontend.url}/health").status_code == 200)
        r = client.completions.create(model="tiny", prompt="hello", max_tokens=3,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3 and not fatal
    finally:
        release.set()
        frontend.stop()
        worker.stop()


def test_frontend_without_a_reachable_worker_is_503(tmp_path):
    frontend = ThreadServer(create_frontend(parse_discovery("static:http://127.0.0.1:9")))  # discard port: nothing listens
    try:
        _wait(lambda: "unreachable" in httpx.get(f"{frontend.url}/health").json()["reason"])
        r = httpx.post(f"{frontend.url}/v1/completions", json={"model": "x", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
    finally:
        frontend.stop()


def test_a_failed_model_load_is_fatal_with_the_reason():
    fatal: list[str] = []

    def broken_load():
        raise FileNotFoundError("no checkpoint at /nowhere")

    async def main():
        engine = AsyncEngine(broken_load, fatal.append)
        engine.start()
        while not fatal:
            await asyncio.sleep(0.01)
        engine.stop()
        return engine

    engine = asyncio.run(main())
    assert engine.state is EngineState.FAILED
    assert fatal == ["model load failed: no checkpoint at /nowhere"] and engine.failure == fatal[0]
