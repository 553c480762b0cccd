"""Start real `splitserve worker` processes (any role) on loopback free ports, for tests
of the disaggregated path below the frontend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from procs import metric_value, spawn
from splitserve.worker import protocol as p
from splitserve.worker.auth import bearer
from splitserve.worker.config import SECRET_ENV


@dataclass
class WorkerProc:
    role: str
    process: subprocess.Popen
    url: str
    info: p.WorkerInfo
    log_path: Path
    secret: str | None = None     # the deployment secret it was started with, if any

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.secret)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(f"{self.url}/metrics", name, **labels)

    def wait_metric(self, name: str, value: float, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while (got := self.metric(name)) != value and time.monotonic() < deadline:
            time.sleep(0.05)
        return got

    def target(self) -> p.PrefillTarget:
        return p.PrefillTarget(self.info.worker_id, self.info.kv_host, self.info.kv_port)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            if sig == signal.SIGSTOP:
                return None
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


def start_worker(role: str, model_dir: Path, workdir: Path, *extra: str, name: str | None = None,
                 timeout: float = 120.0) -> WorkerProc:
    """A decode worker without --discovery may fetch from any prefill KV port on
    loopback (--kv-peers 127.0.0.1) unless the test says otherwise."""
    name = name or role
    if role == "decode" and "--discovery" not in extra and "--kv-peers" not in extra:
        extra = (*extra, "--kv-peers", "127.0.0.1")
    secret = os.environ.get(SECRET_ENV) or None
    proc, port, log_path = spawn(["worker", "--role", role, "--model", str(model_dir), *extra],
                                 workdir, name, timeout)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {name} did not become healthy (exit {proc.poll()}):\n"
                               f"{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                info = msgspec.json.decode(httpx.get(f"{url}/info", timeout=2, headers=bearer(secret)).content,
                                           type=p.WorkerInfo)
                return WorkerProc(role, proc, url, info, log_path, secret)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def listed(discovery: Path, worker_id: str) -> bool:
    """Its record is in file discovery `discovery`, ready: a prefill worker's first records
    (written while it loads, before its port file) carry no KV address yet."""
    try:
        return json.loads((discovery / f"{worker_id}.json").read_text())["state"] == "ready"
    except (OSError, ValueError):
        return False


def generate(d: WorkerProc, request_id: str, prompt: list[int], max_tokens: int,
             prefill: WorkerProc | None, timeout: float = 300.0) -> tuple[int, list[int], list[p.GenerateChunk] | str]:
    """POST /generate on d (greedy, EOS ignored); returns (status, tokens, chunks or error body)."""
    req = p.GenerateRequest(request_id, prompt, p.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                            prefill.target() if prefill else None)
    with httpx.stream("POST", f"{d.url}/generate", content=p.encode(req), timeout=timeout,
                      headers={"content-type": "application/json", **d.auth}) as resp:
        if resp.status_code != 200:
            return resp.status_code, [], resp.read().decode()
        chunks = [p.decode(line, p.GenerateChunk) for line in resp.iter_lines() if line]
    return 200, [t for c in chunks for t in c.new_token_ids], chunks


@contextmanager
def migration_cluster(model_dir: Path, workdir: Path, *engine_args: str, ttl: str = "2"):
    """One prefill and two decode workers (decode-0, decode-1) in a file discovery store
    with a short TTL, and a frontend over them: where a decode worker can be killed
    mid-stream and its requests migrate. Yields (frontend, {name: WorkerProc}, the
    workers' arguments, for starting more); stops them all."""
    from live_server import start_frontend

    discovery = f"file:{workdir / 'discovery'}"
    args = ("--discovery", discovery, "--discovery-ttl", ttl, *engine_args)
    procs = {"prefill": start_worker("prefill", model_dir, workdir, *args),
             "decode-0": start_worker("decode", model_dir, workdir, *args, name="decode-0"),
             "decode-1": start_worker("decode", model_dir, workdir, *args, name="decode-1")}
    frontend = start_frontend(workdir, discovery, "--discovery-ttl", ttl)
    try:
        frontend.wait_health(200)
        yield frontend, procs, args
    finally:
        frontend.stop()
        for proc in procs.values():
            proc.stop()
