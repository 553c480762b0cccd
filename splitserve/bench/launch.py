"""Run `splitserve serve` as a child process for a benchmark and find its parts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class ServeProcess:
    def __init__(self, *serve_args: str, timeout: float = 600.0):
        self._dir = tempfile.TemporaryDirectory(prefix="splitserve-bench-")
        port_file = Path(self._dir.name) / "port"
        self.log_path = Path(self._dir.name) / "serve.log"
        cmd = [sys.executable, "-m", "splitserve", "serve", "--port", "0", "--port-file", str(port_file),
               *serve_args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"serve {' '.join(serve_args)} did not start:\n{log_tail}")
            time.sleep(0.2)
        self.base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.workers = httpx.get(f"{self.base_url}/cluster", timeout=10).json()["workers"]

    def worker_urls(self, role: str) -> list[str]:
        return [w["api_url"] for w in self.workers if w["role"] == role]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._dir.cleanup()

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
