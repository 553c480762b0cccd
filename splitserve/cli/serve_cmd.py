"""`splitserve serve`: frontend + one `both` worker on this machine, as child processes.

Order: the worker starts on a free loopback port and loads its model; once its /health
says ok, the frontend starts on --host/--port. Ctrl-C or SIGTERM stops everything; a
child that dies takes the whole serve down with a message naming it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from splitserve.cli.engine_args import engine_argv, engine_config_from_args
from splitserve.cli.logs import configure_logging
from splitserve.cli.supervisor import Child, Supervisor

logger = logging.getLogger(__name__)

_POLL_S = 0.2


class _Stopped(Exception):
    """Start-up was interrupted by a signal or a dead child; the message says which."""


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = engine_config_from_args(parser, args)
    configure_logging("serve", args.log_level)
    stop = threading.Event()

    def on_signal(signum, _frame):
        logger.info("%s received; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    base = [sys.executable, "-m", "splitserve"]
    common = ["--log-level", args.log_level]
    sup = Supervisor()
    with tempfile.TemporaryDirectory(prefix="splitserve-") as tmp:
        try:
            port_file = Path(tmp) / "worker.port"
            sup.spawn("worker", base + ["worker", "--role", "both", "--host", "127.0.0.1",
                                        "--port", str(args.worker_port),
                                        "--port-file", str(port_file),
                                        *common, *engine_argv(config)])
            worker_url = f"http://127.0.0.1:{_wait_port_file(port_file, sup, stop)}"
            _wait_healthy(f"{worker_url}/health", "worker", sup, stop)
            frontend_port_file = Path(tmp) / "frontend.port"
            sup.spawn("frontend", base + ["frontend", "--host", args.host, "--port", str(args.port),
                                          "--port-file", str(frontend_port_file),
                                          "--worker-url", worker_url, *common])
            port = _wait_port_file(frontend_port_file, sup, stop)
            _wait_healthy(f"http://{_url_host(args.host)}:{port}/health", "frontend", sup, stop)
            if args.port_file:
                _write_atomic(Path(args.port_file), str(port))
            logger.info("ready: OpenAI API at http://%s:%d/v1", _url_host(args.host), port)
            while not stop.wait(_POLL_S):
                _check_children(sup)
            return 0
        except _Stopped as e:
            if stop.is_set():
                return 0
            logger.error("%s; stopping everything", e)
            return 1
        finally:
            sup.stop_all()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _check_children(sup: Supervisor) -> None:
    dead: Child | None = sup.exited()
    if dead is not None:
        raise _Stopped(f"{dead.name} (pid {dead.process.pid}) exited with code {dead.returncode}")


def _wait_port_file(path: Path, sup: Supervisor, stop: threading.Event) -> int:
    while not stop.wait(_POLL_S):
        _check_children(sup)
        if path.exists():
            return int(path.read_text())
    raise _Stopped("interrupted")


def _wait_healthy(url: str, name: str, sup: Supervisor, stop: threading.Event) -> None:
    """Wait (no deadline: a first model load may take minutes) until `url` answers 200."""
    logger.info("waiting for the %s to be healthy (%s)", name, url)
    t0 = time.monotonic()
    with httpx.Client(timeout=2.0) as http:
        while not stop.wait(_POLL_S):
            _check_children(sup)
            try:
                if http.get(url).status_code == 200:
                    logger.info("%s healthy after %.1fs", name, time.monotonic() - t0)
                    return
            except httpx.HTTPError:
                pass  # not listening yet
    raise _Stopped("interrupted")
