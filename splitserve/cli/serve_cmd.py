"""`splitserve serve`: frontend + workers on this machine, as child processes.

Disaggregated by default: --prefill N prefill workers and --decode M decode workers (1
and 1); --aggregated runs one `both` worker instead. Every worker and the frontend share
one discovery: --discovery (e.g. etcd://HOST:PORT, with --namespace/--discovery-ttl), or
by default a `file:` store in a temporary directory that serve creates and removes.
Order: every worker starts on a free loopback port (prefill workers also on a free KV
port) and registers itself; once every worker's /health says ok, the frontend starts on
--host/--port, finds them in discovery and routes with --router (default kv). Ctrl-C or
SIGTERM stops everything.

A child that dies (at start-up too) is restarted with backoff (supervisor.RestartPolicy:
--max-restarts per --restart-window); the others keep serving meanwhile. A restarted
worker keeps its worker id, so its new record (new free ports, `restarts` counted)
replaces the old one in discovery; a restarted frontend takes the same port. A child
over its budget stops everything: serve exits 1 naming it and its exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from splitserve.cli.discovery_args import discovery_argv, discovery_from_args
from splitserve.cli.engine_args import (engine_argv, engine_config_from_args, transfer_argv,
                                        worker_config_from_args)
from splitserve.cli.frontend_args import api_key_from_env, frontend_argv, frontend_config_from_args
from splitserve.cli.logs import configure_logging
from splitserve.cli.supervision_args import restart_policy_from_args
from splitserve.cli.supervisor import RestartLimitReached, Supervisor
from splitserve.cli.vllm_args import vllm_argv, vllm_options_from_args
from splitserve.worker.vllm_options import cpu_core_slices
from splitserve.config import EngineConfig
from splitserve.frontend.auth import API_KEY_ENV
from splitserve.worker.config import SECRET_ENV

logger = logging.getLogger(__name__)

_POLL_S = 0.2
_BASE = [sys.executable, "-m", "splitserve"]


class _Stopped(Exception):
    """Start-up was interrupted by a signal."""


def _worker_roles(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(child name, role) of every worker to start; parser.error() on inconsistent flags."""
    if args.aggregated:
        if args.prefill is not None or args.decode is not None:
            parser.error("--aggregated runs one `both` worker: it takes no --prefill/--decode")
        roles = [("worker", "both")]
    else:
        counts = {"prefill": 1 if args.prefill is None else args.prefill,
                  "decode": 1 if args.decode is None else args.decode}
        for role, n in counts.items():
            if n < 1:
                parser.error(f"--{role} must be at least 1 (or use --aggregated), got {n}")
        roles = [(f"{role}-{i}", role) for role, n in counts.items() for i in range(n)]
    # Check the transfer flags as a worker will, so a bad value is serve's usage error
    # rather than every child dying at start-up.
    worker_config_from_args(parser, argparse.Namespace(
        **{**vars(args), "role": roles[0][1], "host": "127.0.0.1", "kv_port": 0}))
    return roles


def _check_discovery(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error() on a --discovery serve cannot use: its workers register themselves."""
    discovery_from_args(parser, args)
    if args.discovery is not None and args.discovery.startswith("static:"):
        parser.error("serve's workers register themselves: --discovery must be file:DIR or "
                     "etcd://HOST:PORT, not a static list")


def _worker_argv(role: str, port_file: Path, args: argparse.Namespace, config: EngineConfig,
                 discovery: list[str], worker_id: str) -> list[str]:
    """One worker child: on loopback, on free ports, fresh at each restart (the API port
    lands in port_file; a prefill worker's KV port is in its discovery record and /info)."""
    kv = ["--kv-port", "0"] if role == "prefill" else []
    return [*_BASE, "worker", "--role", role, "--host", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), *kv, "--worker-id", worker_id,
            "--log-level", args.log_level, *engine_argv(config), *vllm_argv(args),
            *transfer_argv(args), *discovery]


# libgomp's default spin before an idle OpenMP thread sleeps (300,000 rounds) is long
# enough for an idle engine to burn a core the other engine needs; this short one still
# bridges the gaps inside one forward pass.
SHARED_CORES_SPIN = "10000"


def _share_cores(workers: int, environ: dict[str, str]) -> dict[str, str]:
    """Environment for engine workers that share this machine's cores. Each engine keeps
    every core (or its --threads) and OpenMP waits briefly before sleeping, so a worker
    with nothing to compute leaves the cores to the other. Measured on 2 cores, 1P+1D at
    float32 against one thread each (docs/benchmarks.md): TTFT and TPOT at 1 concurrent
    about 1.5x faster, a 4,000-token prefill 2x, output at 16 concurrent +16%; at 32
    concurrent about 9% slower (both engines busy, oversubscribed). OpenMP settings of
    the caller's win."""
    cores = len(os.sched_getaffinity(0))
    if workers < 2 or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & environ.keys():
        logger.info("%d cores, %d worker(s) sharing them; OpenMP waiting as configured", cores,
                    workers)
        return {}
    logger.info("%d cores shared by %d workers, each engine using all of them; OpenMP spins "
                "briefly before sleeping (GOMP_SPINCOUNT=%s) so an idle engine leaves them to "
                "the others", cores, workers, SHARED_CORES_SPIN)
    return {"GOMP_SPINCOUNT": SHARED_CORES_SPIN}


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = engine_config_from_args(parser, args)
    roles = _worker_roles(parser, args)
    vllm_options_from_args(parser, args, "both" if args.aggregated else "prefill")
    frontend_config_from_args(parser, args)
    _check_discovery(parser, args)
    policy = restart_policy_from_args(parser, args)
    configure_logging("serve", args.log_level)
    cores_env = _share_cores(len(roles), dict(os.environ)) if args.engine == "splitserve" else {}
    stop = threading.Event()

    def on_signal(signum, _frame):
        logger.info("%s received; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # The secret travels in the children's environment: a command line is visible to `ps`.
    env = None if args.kv_secret is None else {**os.environ, SECRET_ENV: args.kv_secret}
    worker_env = {**(env or os.environ), **cores_env} if cores_env else env
    # The API key likewise, to the frontend only.
    api_key = api_key_from_env(args.api_key)
    frontend_env = env if api_key is None else {**(env or os.environ), API_KEY_ENV: api_key}
    sup = Supervisor(policy)
    # The temporary directory holds the port files and, without --discovery, the file
    # discovery store: both go when serve ends.
    with tempfile.TemporaryDirectory(prefix="splitserve-") as tmp:
        discovery = discovery_argv(args.discovery or f"file:{Path(tmp) / 'discovery'}", args)
        logger.info("discovery: %s", " ".join(discovery))
        try:
            # vLLM workers: each its own cores (a CPU build's OpenMP binding).
            slices = (cpu_core_slices(len(roles), args.tensor_parallel_size)
                      if args.engine == "vllm" else [{}] * len(roles))
            for (name, role), cores in zip(roles, slices):
                port_file = Path(tmp) / f"{name}.port"
                sup.spawn(name, _worker_argv(role, port_file, args, config, discovery,
                                             _worker_id(name)),
                          env={**(worker_env or os.environ), **cores} if cores else worker_env,
                          port_file=port_file)
            # All workers load their models in parallel; wait for each in turn.
            for name, _ in roles:
                _wait_ready(name, sup, stop, "127.0.0.1")
            frontend = sup.spawn("frontend", _frontend_argv(args, args.port, Path(tmp), discovery),
                                 env=frontend_env, port_file=Path(tmp) / "frontend.port")
            port = _wait_ready("frontend", sup, stop, _url_host(args.host))
            # A restarted frontend takes the same port: clients keep their URL.
            frontend.argv = _frontend_argv(args, port, Path(tmp), discovery)
            if args.port_file:
                _write_atomic(Path(args.port_file), str(port))
            logger.info("ready: OpenAI API at http://%s:%d/v1", _url_host(args.host), port)
            while not stop.wait(_POLL_S):
                sup.poll()
            return 0
        except _Stopped:
            return 0
        except RestartLimitReached as e:
            logger.error("%s; stopping everything", e)
            return 1
        finally:
            sup.stop_all()


def _worker_id(name: str) -> str:
    """A worker's discovery id: kept across its restarts (the new record replaces the old
    one), unique to this serve on this host."""
    return f"{name}-{socket.gethostname()}-{os.getpid()}"


def _frontend_argv(args: argparse.Namespace, port: int, tmp: Path, discovery: list[str]) -> list[str]:
    return [*_BASE, "frontend", "--host", args.host, "--port", str(port),
            "--port-file", str(tmp / "frontend.port"), "--log-level", args.log_level,
            *frontend_argv(args), *discovery]


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _wait_ready(name: str, sup: Supervisor, stop: threading.Event, host: str) -> int:
    """Wait (no deadline: a first model load may take minutes) until child `name` listens
    and its /health answers 200; its port. A child that exits meanwhile is restarted
    (sup.poll) and waited for again, on its new port."""
    logger.info("waiting for %s to be healthy", name)
    t0 = time.monotonic()
    child = sup.children[name]
    pid, port = None, None
    with httpx.Client(timeout=2.0) as http:
        while not stop.wait(_POLL_S):
            sup.poll()
            if child.pid != pid:            # restarted (or waiting to be): its port is new
                pid, port = child.pid, None
            if not child.running:
                continue
            if port is None:
                if not child.port_file.exists():
                    continue
                port = int(child.port_file.read_text())
            try:
                if http.get(f"http://{host}:{port}/health").status_code == 200:
                    logger.info("%s healthy after %.1fs (port %d)", name, time.monotonic() - t0, port)
                    return port
            except httpx.HTTPError:
                pass  # not listening yet
    raise _Stopped("interrupted")
