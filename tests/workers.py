"""Start real `splitserve worker` processes (any role) on loopback free ports, for tests
of the disaggregated path below the frontend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from splitserve.worker import protocol as p


def metric_value(url: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`, from Prometheus text;
    0 when the metric is exported but has no such sample yet (a labelled counter before
    its first event). A metric that is not exported at all is an error."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    total, exported = 0.0, False
    for family in text_string_to_metric_families(text):
        names = {family.name, family.name + "_total"}
        exported = exported or name in names or any(s.name == name for s in family.samples)
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    if not exported:
        raise AssertionError(f"metric {name} not found at {url}")
    return total


@dataclass
class WorkerProc:
    role: str
    process: subprocess.Popen
    url: str
    info: p.WorkerInfo
    log_path: Path

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
    name = name or role
    port_file = workdir / f"{name}.port"
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "splitserve", "worker", "--role", role, "--model", str(model_dir),
           "--port", "0", "--port-file", str(port_file), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {name} did not start (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}")
        if port_file.exists() and port_file.read_text().strip():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    info = msgspec.json.decode(httpx.get(f"{url}/info", timeout=2).content, type=p.WorkerInfo)
                    return WorkerProc(role, proc, url, info, log_path)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)


def generate(d: WorkerProc, request_id: str, prompt: list[int], max_tokens: int,
             prefill: WorkerProc | None, timeout: float = 300.0) -> tuple[int, list[int], list[p.GenerateChunk] | str]:
    """POST /generate on d (greedy, EOS ignored); returns (status, tokens, chunks or error body)."""
    req = p.GenerateRequest(request_id, prompt, p.Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                            prefill.target() if prefill else None)
    with httpx.stream("POST", f"{d.url}/generate", content=p.encode(req), timeout=timeout,
                      headers={"content-type": "application/json"}) as resp:
        if resp.status_code != 200:
            return resp.status_code, [], resp.read().decode()
        chunks = [p.decode(line, p.GenerateChunk) for line in resp.iter_lines() if line]
    return 200, [t for c in chunks for t in c.new_token_ids], chunks
