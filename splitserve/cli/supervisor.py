"""Child processes kept running: a child that exits is restarted, within a budget.

Children run in their own session, so a Ctrl-C reaches only the supervisor, which then
stops them in order (SIGTERM, SIGKILL after a grace period). If the supervisor itself is
killed, Linux's PR_SET_PDEATHSIG makes the kernel send each child SIGTERM: no orphans.

Restart policy (as systemd's Restart=always with a start limit): a child that exits, for
whatever reason, is started again after a backoff that doubles from backoff_initial_s up
to backoff_max_s with each exit inside the window. More than max_restarts exits of one
child within restart_window_s and the supervisor gives up (RestartLimitReached, naming
the child and its exit codes); its caller then stops everything. Each restarted child
finds its restart count in its environment (RESTARTS_ENV).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.config import option

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# How many times this child was restarted; a worker publishes it in its discovery record.
RESTARTS_ENV = "SPLITSERVE_RESTARTS"


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = option(5, metavar="N", help=(
        "restarts of one crashed child (worker or frontend) allowed within --restart-window; "
        "one more exit stops serve with an error; 0 never restarts"))
    restart_window_s: float = option(300.0, flag="--restart-window", metavar="SECONDS",
                                     help="the window --max-restarts counts in")
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.restart_window_s > 0:
            raise ValueError(f"restart_window must be > 0, got {self.restart_window_s}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(f"need 0 < backoff_initial_s <= backoff_max_s, got "
                             f"{self.backoff_initial_s} and {self.backoff_max_s}")

    def backoff_s(self, recent_exits: int) -> float:
        """The wait before restarting a child that exited recent_exits times (this exit
        included) within the window: 1 s, 2 s, 4 s, … by default, capped."""
        return min(self.backoff_initial_s * 2 ** (recent_exits - 1), self.backoff_max_s)


class RestartLimitReached(Exception):
    """A child exited more often than its policy allows; the message says which and how."""


def _code(returncode: int) -> str:
    """An exit status as an operator reads it: 1, or SIGKILL for a child killed by it."""
    if returncode >= 0:
        return str(returncode)
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {_code(returncode)}"
    return f"exited with code {returncode}"


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@dataclass
class Child:
    """One supervised command. port_file, if any, is written by the child once it listens;
    it is removed before each start, so a reader never sees a dead predecessor's port."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None       # None: the supervisor's environment
    port_file: Path | None = None
    process: subprocess.Popen | None = None  # None while waiting to be restarted
    restarts: int = 0
    restart_at: float | None = None          # monotonic time of the pending restart
    # (monotonic time, return code) of its exits within the restart window.
    exits: deque[tuple[float, int]] = field(default_factory=deque)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    def __init__(self, policy: RestartPolicy = RestartPolicy(), grace_s: float = 10.0):
        self.policy = policy
        self.grace_s = grace_s
        self.children: dict[str, Child] = {}   # in start order

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              port_file: Path | None = None) -> Child:
        """Start `argv` as child `name` and keep it running from now on."""
        child = self.children[name] = Child(name, argv, env, port_file)
        self._start(child)
        logger.info("started %s (pid %d)", name, child.pid)
        return child

    def _start(self, child: Child) -> None:
        if child.port_file is not None:
            child.port_file.unlink(missing_ok=True)
        env = {**(os.environ if child.env is None else child.env), RESTARTS_ENV: str(child.restarts)}
        parent = os.getpid()
        child.process = subprocess.Popen(child.argv, start_new_session=True, env=env,
                                         preexec_fn=lambda: _die_with_parent(parent))
        child.restart_at = None

    def poll(self) -> None:
        """Notice exited children and restart those whose backoff is over. Raises
        RestartLimitReached when a child exits once more than its budget allows."""
        now = time.monotonic()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is not None:
                self._exited(child, now)
            elif child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._start(child)
                logger.warning("restarted %s (restart %d): pid %d", child.name, child.restarts,
                               child.pid)

    def _exited(self, child: Child, now: float) -> None:
        pid, code = child.process.pid, child.process.returncode
        child.process = None
        while child.exits and child.exits[0][0] < now - self.policy.restart_window_s:
            child.exits.popleft()
        child.exits.append((now, code))
        window = f"{self.policy.restart_window_s:g}s"
        if len(child.exits) > self.policy.max_restarts:
            codes = ", ".join(_code(c) for _, c in child.exits)
            raise RestartLimitReached(
                f"{child.name} (pid {pid}) {describe_exit(code)}; it exited {len(child.exits)} "
                f"times within {window} (exit codes: {codes}), more than the {self.policy.max_restarts} "
                f"restarts allowed (--max-restarts/--restart-window)")
        delay = self.policy.backoff_s(len(child.exits))
        child.restart_at = now + delay
        logger.warning("%s (pid %d) %s; restarting it in %.1fs (restart %d of at most %d within %s)",
                       child.name, pid, describe_exit(code), delay, len(child.exits),
                       self.policy.max_restarts, window)

    def stop_all(self) -> None:
        # Reverse start order: the frontend stops taking requests before its workers go.
        alive = [c for c in reversed(self.children.values()) if c.running]
        for c in alive:
            logger.info("stopping %s (pid %d)", c.name, c.pid)
            c.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for c in alive:
            try:
                c.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not stop within %.0fs; killing it", c.name,
                               c.pid, self.grace_s)
                c.process.kill()
                c.process.wait()
