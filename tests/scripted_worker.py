"""The real frontend app in front of one faked `both` worker whose answers are scripted
token ids, for tests of what the frontend makes of a token stream (reasoning split,
/tokenize, the API key) when no tiny model can be made to write that stream.

The worker is faked at the HTTP layer (httpx.MockTransport behind the frontend's worker
client): the frontend polls its /health and /info, loads the tokenizer files it serves
from the model directory (GET /tokenizer), and reads /generate's token chunks exactly as from a real one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec
from fastapi.testclient import TestClient

from splitserve.discovery import StaticDiscovery, StaticDiscoveryConfig
from splitserve.frontend.app import create_app
from splitserve.frontend.config import FrontendConfig
from splitserve.worker import protocol as p
from splitserve.worker.tokenizer_files import read_tokenizer_files

MODEL = "tiny"
MAX_MODEL_LEN = 512


class ScriptedWorker:
    """/generate streams `tokens` (at most max_tokens of them), one token per chunk, the
    last with finish_reason 'stop' (all of them sent) or 'length'. `received` holds every
    /generate body."""

    def __init__(self, model_dir: Path, tokens: list[int] | None = None):
        self.model_dir, self.tokens = model_dir, tokens or []
        self.received: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(200, content=p.encode(p.WorkerHealth("ok")))
        if path == "/info":
            return httpx.Response(200, content=p.encode(p.WorkerInfo(
                role="both", model_name=MODEL, model_dir=str(self.model_dir),
                max_model_len=MAX_MODEL_LEN, block_size=16, eos_token_ids=[2], worker_id="w0")))
        if path == "/tokenizer":
            return httpx.Response(200, content=msgspec.json.encode(read_tokenizer_files(self.model_dir)))
        if path == "/kv_events":
            async def idle():   # no cache events; the stream stays open as a worker's does
                await asyncio.Event().wait()
                yield b""
            return httpx.Response(200, content=idle())
        assert path == "/generate", f"unexpected {request.method} {request.url}"
        body = json.loads(request.content)
        self.received.append(body)
        todo = self.tokens[:body["sampling"]["max_tokens"]]
        reason = "stop" if len(todo) == len(self.tokens) else "length"
        chunks = [p.GenerateChunk(new_token_ids=[t]) for t in todo]
        chunks[-1].finish_reason = reason
        return httpx.Response(200, content=b"".join(p.encode_line(c) for c in chunks))


@contextmanager
def frontend(worker: ScriptedWorker, config: FrontendConfig | None = None,
             headers: dict[str, str] | None = None) -> Iterator[TestClient]:
    """A started frontend (lifespan run) serving through `worker`, once /health is 200."""
    app = create_app(StaticDiscovery(StaticDiscoveryConfig(("http://w0:1",))), config,
                     transport=httpx.MockTransport(worker))
    with TestClient(app, headers=headers) as http:
        deadline = time.monotonic() + 60     # loading the tokenizer on a loaded machine
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, http.get("/health").json()
            time.sleep(0.05)
        yield http
