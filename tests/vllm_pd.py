"""Helpers for tests of `serve --engine vllm` disaggregated (1 prefill + 1 decode vLLM
worker): start it, talk to its decode worker directly, wait for its KV blocks to be free,
and kill its prefill worker with vLLM's processes under it."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
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


def wait_restarted(server: LiveServer, role: str, old_url: str) -> None:
    """serve restarts a killed worker on a new port: until the new one is ready;
    server.workers[role] follows it."""
    def new_urls() -> list[str]:
        return [w["api_url"] for w in server.cluster()["workers"]
                if w["role"] == role and w["state"] == "ready" and w["api_url"] != old_url]

    wait_for(lambda: bool(new_urls()), f"serve to restart the {role} worker", timeout=600)
    server.workers[role] = new_urls()


def kill_prefill_mid_transfer(server: LiveServer, ask: Callable[[str], object],
                              attempts: int = 3) -> tuple[str, object]:
    """ask(request_id) in a thread; the prefill worker (vLLM's processes with it) SIGKILLed
    once its first KV blocks are out. Returns (request_id, what ask returned) of an attempt
    where the kill landed mid-transfer, as the decode worker's log says: "KV load failed".

    The metric that says blocks are out lags P by a scheduler step and a scrape; on a
    loaded machine the kill can land after P's last block ("KV loaded"). That attempt
    shows nothing about the fault, so it is made again once serve has restarted the
    prefill worker, with a new request id: ask must make each id's prompt start
    differently, or the decode worker's prefix cache leaves one block to transfer."""
    for attempt in range(attempts):
        rid = f"kill-p{attempt}"
        (p_url,) = server.workers["prefill"]
        sent0 = metric_value(f"{p_url}/metrics", "splitserve_kv_transfer_bytes_total",
                             direction="sent")
        result: dict = {}
        request = threading.Thread(target=lambda: result.update(out=ask(rid)))
        request.start()
        wait_first_blocks_sent(p_url, sent0)
        kill_tree(worker_pid(server, "prefill"))
        request.join(600)
        assert not request.is_alive(), f"request {rid} still running 600 s after the kill"
        outcome = re.compile(rf"request_id={rid}\S* transfer \S+: KV load(ed| failed| crashed)")
        wait_for(lambda: outcome.search(server.log()), f"the decode worker's KV outcome of {rid}")
        if outcome.search(server.log()).group(1) != "ed":
            return rid, result["out"]
        wait_restarted(server, "prefill", p_url)
    raise AssertionError(f"the prefill worker's kill landed after its last KV block {attempts} "
                         f"times:\n{server.log()[-4000:]}")


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


def wait_for(check, what: str, timeout: float = 60.0, detail: Callable[[], str] = lambda: ""):
    """check()'s first truthy value, polled until the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{detail()}"
        time.sleep(0.2)
    return value


def blocks_in_use(url: str) -> tuple[int, int]:
    s = httpx.get(f"{url}/stats", timeout=10).json()
    return s["num_requests_running"], s["kv_blocks_in_use"]


def wait_all_free(*urls: str, timeout: float = 60.0) -> None:
    """Every KV block free again on each worker (a prefill worker's once the decode worker
    released them, or its lease ran out), nothing running."""
    for url in urls:
        wait_for(lambda: blocks_in_use(url) == (0, 0), f"{url} to free every KV block", timeout)
