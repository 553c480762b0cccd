"""Child processes for tests: start a `splitserve` command that writes its port to a file,
and read Prometheus metrics from what it serves. One place for both, used by
live_server (serve, frontend) and workers (worker)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx


def spawn(argv: list[str], workdir: Path, name: str, timeout: float) -> tuple[subprocess.Popen, int, Path]:
    """Run `python -m splitserve *argv --port 0 --port-file …`, logging to workdir/name.log;
    returns (process, bound port, log path) once the port file is written."""
    port_file = workdir / f"{name}.port"
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "splitserve", *argv, "--port", "0", "--port-file", str(port_file)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not start (exit {proc.poll()}):\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)
    return proc, int(port_file.read_text()), log_path


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
