"""Helpers for tests of `serve --engine vllm` disaggregated (1 prefill + 1 decode vLLM
worker): start it, talk to its decode worker directly, wait for its KV blocks to be free,
and kill its prefill worker with vLLM's processes under it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from live_server import LiveServer, child_pids, descendants, pid_alive, start_serve
from procs import metric_value

MODEL = "smol"
BLOCK = 32            # vLLM CPU's attention needs a multiple of 32
# Chunked prefill, 32 tokens a step: a long prompt's blocks leave P while it computes.
SERVE_ARGS = ("--engine", "vllm", "--dtype", "float32", "--block-size", str(BLOCK),
              "--enforce-eager", "--max-model-len", "2048", "--max-num-batched-tokens", "32",
              "--max-num-seqs", "8",
              "--kv-cache-memory", "256MiB", "--served-model-name", MODEL)
STORY = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting "
         "the steps as his father had taught him, and when he reached the lamp room he "
         "wiped the great lens clean of salt before lighting the wick. ")


def start_vllm_pd(workdir: Path, *extra: str) -> LiveServer:
    """The embedded SmolLM2 (splitserve's default model), by vLLM CPU in float32."""
    return start_serve(None, workdir, *SERVE_ARGS, *extra, timeout=1200)


@contextmanager
def vllm_pd_server(workdir: Path, *extra: str) -> Iterator[LiveServer]:
    """start_vllm_pd for a module: afterwards every KV block is free, serve stops cleanly,
    and no worker (those serve restarted included) nor vLLM process is left."""
    srv = start_vllm_pd(workdir, *extra)
    processes = descendants(srv.process.pid)
    yield srv
    try:
        wait_all_free(srv.worker_url)
    finally:
        processes += descendants(srv.process.pid)      # workers serve restarted too
        assert srv.stop(timeout=120) == 0, srv.log()[-3000:]
        wait_for(lambda: not [p for p in processes if pid_alive(p)],
                 "serve's workers and vLLM's processes to exit", timeout=60)


def wait_first_blocks_sent(prefill_url: str, sent_before: float) -> None:
    """Until the prefill worker has sent KV bytes beyond sent_before: a transfer is under way."""
    wait_for(lambda: metric_value(f"{prefill_url}/metrics", "splitserve_kv_transfer_bytes_total",
                                  direction="sent") > sent_before,
             "the first blocks to leave the prefill worker", timeout=300)


def worker_pid(server: LiveServer, role: str) -> int:
    """serve's child running the `role` worker."""
    for pid in child_pids(server.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"worker" in cmdline and role.encode() in cmdline:
            return pid
    raise AssertionError(f"no {role} worker under serve")


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and vLLM's engine and worker processes under it, all at once (the
    KV server lives in vLLM's worker process)."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def prefill_target(server: LiveServer) -> dict:
    (url,) = server.workers["prefill"]
    info = httpx.get(f"{url}/info", timeout=10).json()
    return {"worker_id": info["worker_id"], "kv_host": info["kv_host"], "kv_port": info["kv_port"]}


def generate(decode_url: str, request_id: str, prompt: list[int], target: dict,
             **sampling) -> tuple[int, list[int], list[dict] | dict]:
    """POST /generate to the decode worker naming the prefill worker: (status, tokens,
    chunks or the error body)."""
    body = {"request_id": request_id, "prompt_token_ids": prompt, "sampling": sampling,
            "prefill": target}
    resp = httpx.post(f"{decode_url}/generate", json=body, timeout=600)
    if resp.status_code != 200:
        return resp.status_code, [], resp.json()
    chunks = [json.loads(line) for line in resp.text.splitlines()]
    return 200, [t for c in chunks for t in c.get("new_token_ids", [])], chunks


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def blocks_in_use(url: str) -> tuple[int, int]:
    s = httpx.get(f"{url}/stats", timeout=10).json()
    return s["num_requests_running"], s["kv_blocks_in_use"]


def wait_all_free(*urls: str, timeout: float = 60.0) -> None:
    """Every KV block free again on each worker (a prefill worker's once the decode worker
    released them, or its lease ran out), nothing running."""
    for url in urls:
        wait_for(lambda: blocks_in_use(url) == (0, 0), f"{url} to free every KV block", timeout)
