"""Child processes that live and die together.

Children run in their own session, so a Ctrl-C reaches only the supervisor, which then
stops them in order (SIGTERM, SIGKILL after a grace period). If the supervisor itself is
killed, Linux's PR_SET_PDEATHSIG makes the kernel send each child SIGTERM: no orphans.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@dataclass
class Child:
    name: str
    process: subprocess.Popen

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


class Supervisor:
    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        """Start `argv` as child `name`; env=None: this process's environment."""
        parent = os.getpid()
        proc = subprocess.Popen(argv, start_new_session=True, env=env,
                                preexec_fn=lambda: _die_with_parent(parent))
        child = Child(name, proc)
        self.children.append(child)
        logger.info("started %s (pid %d)", name, proc.pid)
        return child

    def exited(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if c.returncode is not None), None)

    def stop_all(self) -> None:
        # Reverse start order: the frontend stops taking requests before its workers go.
        alive = [c for c in reversed(self.children) if c.returncode is None]
        for c in alive:
            logger.info("stopping %s (pid %d)", c.name, c.process.pid)
            c.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for c in alive:
            try:
                c.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not stop within %.0fs; killing it", c.name,
                               c.process.pid, self.grace_s)
                c.process.kill()
                c.process.wait()
