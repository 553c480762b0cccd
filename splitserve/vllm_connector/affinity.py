"""KV threads are not pinned to the model's compute cores.

vLLM's CPU worker binds its OpenMP threads, the calling thread included, to the cores in
VLLM_CPU_OMP_THREADS_BIND; threads started from it inherit that binding. The KV server's
and the pulls' threads only move bytes, but pinned there they queue behind OpenMP workers
that spin between kernels, and under load a prefill worker then misses its PROGRESS
heartbeats (D declares it stalled) or a handshake times out. They run wherever the
kernel finds room instead. On Linux the affinity of pid 0 is the calling thread's alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)


def _all_cpus() -> set[int]:
    try:
        text = open("/sys/devices/system/cpu/online").read().strip()
    except OSError:
        return set(range(os.cpu_count() or 1))
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


@contextlib.contextmanager
def unpinned() -> Iterator[None]:
    """Threads started inside inherit every CPU; the calling thread's binding is restored."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, _all_cpus())
    except OSError as e:    # a cpuset narrower than the online CPUs: keep the binding
        log.debug("could not widen the KV threads' CPU affinity: %s", e)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
