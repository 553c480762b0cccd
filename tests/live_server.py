"""Start a real `splitserve serve` subprocess on loopback free ports for tests, and read
Prometheus metrics from its processes. Reusable by any test module that needs a live
server (use it from a module- or session-scoped fixture)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from procs import metric_value, spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of pid, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process under pid (children, theirs, ...), from /proc."""
    out = []
    for child in child_pids(pid):
        out += [child, *descendants(child)]
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class LiveServer:
    process: subprocess.Popen
    base_url: str       # the OpenAI API root, e.g. http://127.0.0.1:PORT
    workers: dict[str, list[str]]   # role -> the workers' API URLs, as GET /cluster lists them
    log_path: Path

    @property
    def worker_url(self) -> str:
        """The worker that streams tokens to the frontend: the `both` worker, or the decode
        worker (for a serve with exactly one of them)."""
        urls = self.workers.get("both") or self.workers.get("decode")
        assert urls and len(urls) == 1, f"no single both/decode worker: {self.workers}"
        return urls[0]

    @property
    def worker_urls(self) -> list[str]:
        return [url for urls in self.workers.values() for url in urls]

    def cluster(self) -> dict:
        return httpx.get(f"{self.base_url}/cluster", timeout=10).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_metric(self, name: str, url: str | None = None) -> float:
        return metric_value(f"{url or self.worker_url}/metrics", name)

    def frontend_metric(self, name: str) -> float:
        return metric_value(f"{self.base_url}/metrics", name)

    def wait_worker_metric(self, name: str, value: float, timeout: float = 15.0,
                           url: str | None = None) -> float:
        deadline = time.monotonic() + timeout
        while (got := self.worker_metric(name, url)) != value and time.monotonic() < deadline:
            time.sleep(0.1)
        return got

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_serve(model_dir: Path | None, workdir: Path, *extra_args: str, timeout: float = 180.0) -> LiveServer:
    """Run `splitserve serve *extra_args` (disaggregated unless they say `--aggregated`) and
    wait until it reports ready. model_dir=None serves the embedded default model."""
    model_args = [] if model_dir is None else ["--model", str(model_dir)]
    proc, port, log_path = spawn(["serve", *model_args, *extra_args], workdir, "serve", timeout)
    base_url = f"http://127.0.0.1:{port}"
    workers: dict[str, list[str]] = {}
    for w in httpx.get(f"{base_url}/cluster", timeout=10).json()["workers"]:
        workers.setdefault(w["role"], []).append(w["api_url"])
    return LiveServer(proc, base_url, workers, log_path)


@dataclass
class FrontendProc:
    """A `splitserve frontend` process (workers from discovery), for tests that kill or
    restart workers independently (under `serve`, a dead child stops everything)."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> tuple[int, dict]:
        resp = httpx.get(f"{self.base_url}/health", timeout=10)
        return resp.status_code, resp.json()

    def wait_health(self, status: int, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while (got := self.health())[0] != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"frontend /health stayed {got} (waited for {status})")
            time.sleep(0.1)
        return got[1]

    def metric(self, name: str) -> float:
        return metric_value(f"{self.base_url}/metrics", name)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def start_frontend(workdir: Path, discovery: str, *extra_args: str, name: str = "frontend",
                   timeout: float = 60.0) -> FrontendProc:
    """Run `splitserve frontend --discovery DISCOVERY *extra_args` and wait until it listens
    (not until it is healthy: tests decide what they wait for)."""
    proc, port, log_path = spawn(["frontend", "--discovery", discovery, *extra_args], workdir, name, timeout)
    return FrontendProc(proc, f"http://127.0.0.1:{port}", log_path)
