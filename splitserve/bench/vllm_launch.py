"""Run plain `vllm serve` processes as children: one aggregated server, or a prefill and a
decode server disaggregated through SplitserveConnector behind `splitserve vllm-proxy`
(the README's "vLLM KV connector" commands, on loopback free ports).

Each vLLM server gets its own process group (its engine and worker processes go with it
on stop) and its own cores: VLLM_CPU_OMP_THREADS_BIND for the model's threads, and a CPU
affinity for all its processes, so a server's API and engine-core processes (which spin
while a request waits for remote KV) do not take another server's cores. On a CUDA build
the CPU variable is ignored. Block size 32: vLLM CPU's attention needs a multiple of 32.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BLOCK_SIZE = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connector_config(role: str, extra: dict) -> dict:
    return {"kv_connector": "SplitserveConnector",
            "kv_connector_module_path": "splitserve.vllm_connector", "kv_role": role,
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


class VllmServe:
    """`vllm serve MODEL` on a free loopback port; started at once, `wait()` for health.
    `executable` defaults to the `vllm` next to this Python; `block_size` None leaves
    vLLM's own default."""

    def __init__(self, model: str, log_path: Path, *, cores: list[int], args: list[str] = (),
                 kv_config: dict | None = None, kv_cache_gib: int = 2,
                 executable: str | None = None, block_size: int | None = BLOCK_SIZE):
        self.log_path = log_path
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        cmd = [executable or str(Path(sys.executable).parent / "vllm"), "serve", model,
               "--host", "127.0.0.1", "--port", str(port), *args]
        if block_size is not None:
            cmd += ["--block-size", str(block_size)]
        if kv_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_config)]
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores)),
                   VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True,
                                            preexec_fn=lambda: os.sched_setaffinity(0, cores))

    def wait(self, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-4000:]
                self.stop()
                raise RuntimeError(f"vllm serve at {self.base_url} did not start:\n{tail}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass   # not listening yet
            time.sleep(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        # SIGTERM to the group, then SIGKILL to whatever of it is left: vLLM's engine core
        # and workers can outlive the API server for a while.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> "VllmServe":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class VllmPair:
    """Prefill (kv_producer) and decode (kv_consumer) `vllm serve` with SplitserveConnector,
    each on its own cores, behind `splitserve vllm-proxy` (`base_url`). Both servers start
    at the same time; `transfer` is extra TransferConfig settings for both."""

    def __init__(self, model: str, workdir: Path, *, p_cores: list[int], d_cores: list[int],
                 args: list[str] = (), p_args: list[str] = (), transfer: dict | None = None,
                 timeout: float = 900.0):
        transfer = dict(transfer or {})
        self.kv_port = free_port()
        self.proxy: subprocess.Popen | None = None
        self.p = VllmServe(model, workdir / "prefill.log", cores=p_cores, args=[*args, *p_args],
                           kv_config=connector_config("kv_producer",
                                                      {"kv_port": self.kv_port, **transfer}))
        self.d = VllmServe(model, workdir / "decode.log", cores=d_cores, args=list(args),
                           kv_config=connector_config("kv_consumer", transfer))
        try:
            self.p.wait(timeout)
            self.d.wait(timeout)
            self.base_url = self._start_proxy(workdir)
        except BaseException:
            self.stop()
            raise

    def _start_proxy(self, workdir: Path) -> str:
        port_file, log_path = workdir / "proxy.port", workdir / "proxy.log"
        cmd = [sys.executable, "-m", "splitserve", "vllm-proxy", "--prefill", self.p.base_url,
               "--decode", self.d.base_url, "--prefill-kv", f"127.0.0.1:{self.kv_port}",
               "--port", "0", "--port-file", str(port_file)]
        with open(log_path, "wb") as log:
            self.proxy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm-proxy did not start:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return f"http://127.0.0.1:{int(port_file.read_text())}"

    def stop(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(30)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        self.d.stop()
        self.p.stop()

    def __enter__(self) -> "VllmPair":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
