"""`serve`'s supervision: a child that exits is restarted with backoff, keeps its place,
learns its restart count, and one that exits too often within the window stops serve
with a message naming it and its exit codes (as systemd's start limit does)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from live_server import LiveServer, child_pids, start_serve
from splitserve.cli.main import build_parser
from splitserve.cli.supervision_args import restart_policy_from_args
from splitserve.cli.supervisor import (RESTARTS_ENV, RestartLimitReached, RestartPolicy,
                                       Supervisor)
from splitserve.transfer.shmfile import PREFIX, shm_dir

FAST = RestartPolicy(max_restarts=3, restart_window_s=60, backoff_initial_s=0.05, backoff_max_s=0.1)


def _poll_until(sup: Supervisor, done, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        sup.poll()
        time.sleep(0.01)


def test_backoff_doubles_from_one_second_up_to_its_cap():
    policy = RestartPolicy()
    assert (policy.max_restarts, policy.restart_window_s) == (5, 300)
    assert [policy.backoff_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize("argv, message", [
    (["--max-restarts", "-1"], "max_restarts must be >= 0"),
    (["--restart-window", "0"], "restart_window must be > 0"),
])
def test_bad_restart_flags_are_usage_errors(argv, message, capsys):
    args = build_parser().parse_args(["serve", *argv])
    with pytest.raises(SystemExit) as e:
        restart_policy_from_args(args.parser, args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_restart_flags_default_to_the_policy():
    args = build_parser().parse_args(["serve"])
    assert restart_policy_from_args(args.parser, args) == RestartPolicy()
    args = build_parser().parse_args(["serve", "--max-restarts", "2", "--restart-window", "30"])
    assert restart_policy_from_args(args.parser, args) == RestartPolicy(2, 30.0)


def test_a_killed_child_is_restarted_with_its_count_and_a_fresh_port_file(tmp_path, caplog):
    port_file = tmp_path / "child.port"
    # Each start records the restart count it was given, then writes its "port" and waits.
    script = (f"import os, time; open({str(tmp_path / 'starts')!r}, 'a').write("
              f"os.environ[{RESTARTS_ENV!r}] + '\\n'); open({str(port_file)!r}, 'w').write("
              f"str(os.getpid())); time.sleep(60)")
    sup = Supervisor(FAST, grace_s=5)
    try:
        other = sup.spawn("other", [sys.executable, "-c", "import time; time.sleep(60)"])
        child = sup.spawn("child", [sys.executable, "-c", script], port_file=port_file)
        first = child.pid
        _poll_until(sup, lambda: port_file.exists())
        child.process.send_signal(signal.SIGKILL)
        # The dead child's port file goes before its successor starts.
        _poll_until(sup, lambda: child.pid not in (None, first))
        assert not port_file.exists() or int(port_file.read_text()) == child.pid
        _poll_until(sup, lambda: port_file.exists() and int(port_file.read_text()) == child.pid)
        assert (tmp_path / "starts").read_text().split() == ["0", "1"]
        assert child.restarts == 1 and other.running and other.restarts == 0
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert f"child (pid {first}) was killed by SIGKILL; restarting it in " in warnings[0]
        assert warnings[1] == f"restarted child (restart 1): pid {child.pid}"
    finally:
        sup.stop_all()
    assert not child.running and not other.running


def test_a_child_that_keeps_exiting_exhausts_its_budget(tmp_path):
    sup = Supervisor(FAST, grace_s=5)
    try:
        other = sup.spawn("other", [sys.executable, "-c", "import time; time.sleep(60)"])
        sup.spawn("crashy", [sys.executable, "-c", "raise SystemExit(3)"])
        t0 = time.monotonic()
        with pytest.raises(RestartLimitReached) as e:
            _poll_until(sup, lambda: False)
        # Three restarts after 0.05 s, 0.1 s, 0.1 s (capped), then the fourth exit gives up.
        assert time.monotonic() - t0 >= 0.25
        assert "crashy (pid" in str(e.value)
        assert ("exited with code 3; it exited 4 times within 60s (exit codes: 3, 3, 3, 3), "
                "more than the 3 restarts allowed") in str(e.value)
        assert other.running and other.restarts == 0
    finally:
        sup.stop_all()


def test_exits_older_than_the_window_are_forgiven():
    # One restart per 0.3 s window: a child exiting every ~0.5 s (its backoff plus its
    # own life) never has two exits in one window.
    policy = RestartPolicy(max_restarts=1, restart_window_s=0.3, backoff_initial_s=0.05,
                           backoff_max_s=0.05)
    sup = Supervisor(policy, grace_s=5)
    try:
        child = sup.spawn("slow", [sys.executable, "-c", "import time; time.sleep(0.45)"])
        _poll_until(sup, lambda: child.restarts == 3)
    finally:
        sup.stop_all()


# --- under a real `splitserve serve` -------------------------------------------------------

def _child_by_worker_id(serve_pid: int) -> dict[str, int]:
    """worker id (the value of --worker-id) -> pid, for serve's worker children."""
    out = {}
    for pid in child_pids(serve_pid):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"--worker-id" in argv:
            out[argv[argv.index(b"--worker-id") + 1].decode()] = pid
    return out


_sent = iter(range(1_000_000))


def _complete(srv: LiveServer) -> httpx.Response:
    # A distinct prompt each time: no prefix cache can spare a KV transfer.
    return httpx.post(f"{srv.base_url}/v1/completions", timeout=60,
                      json={"prompt": f"request {next(_sent)}: " + "tell me more " * 8,
                            "max_tokens": 3, "ignore_eos": True})


def _shm_files_of(pid: int) -> list[Path]:
    return list(Path(shm_dir()).glob(f"{PREFIX}{pid}-*"))


def _kill_and_wait_back(srv: LiveServer, worker_id: str, ok_while_down: set[int]) -> dict:
    """SIGKILL the worker, keep sending requests (each answered with a status in
    ok_while_down) until /cluster shows it back: ready, restarted once. Its entry."""
    pid = _child_by_worker_id(srv.process.pid)[worker_id]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, f"{worker_id} did not come back: {srv.cluster()}"
        r = _complete(srv)
        assert r.status_code in ok_while_down, r.text
        # Absent: its record outlived the TTL before the restarted worker registered again.
        entry = next((w for w in srv.cluster()["workers"] if w["id"] == worker_id), None)
        if entry is not None and entry["restarts"] == 1 and entry["state"] == "ready":
            break
        time.sleep(0.2)
    assert srv.process.poll() is None
    assert _child_by_worker_id(srv.process.pid)[worker_id] != pid
    assert f"(pid {pid}) was killed by SIGKILL; restarting it in 1.0s" in srv.log()
    return entry


def test_sigkilled_workers_come_back_under_serve_and_serve_again(tiny_llama_dir, tmp_path):
    srv = start_serve(tiny_llama_dir, tmp_path, "--decode", "2", "--router", "round-robin",
                      "--max-model-len", "512")
    try:
        ids = sorted(w["id"] for w in srv.cluster()["workers"])
        assert [i.split("-")[:2] for i in ids] == [["decode", "0"], ["decode", "1"], ["prefill", "0"]]
        assert all(w["restarts"] == 0 for w in srv.cluster()["workers"])
        decode0, _, prefill0 = ids

        # A decode worker: the other one answers meanwhile, every request is a 200.
        entry = _kill_and_wait_back(srv, decode0, {200})
        # Round-robin over two decode workers: two of every four requests go through it.
        before = srv.worker_metric("splitserve_kv_transfers_total", entry["api_url"])
        assert all(_complete(srv).status_code == 200 for _ in range(4))
        assert srv.worker_metric("splitserve_kv_transfers_total", entry["api_url"]) == before + 2

        # The only prefill worker: until it is back a request may find no usable pair (503).
        old_kv_files = _shm_files_of(_child_by_worker_id(srv.process.pid)[prefill0])
        entry = _kill_and_wait_back(srv, prefill0, {200, 503})
        assert all(_complete(srv).status_code == 200 for _ in range(2))
        sent = srv.worker_metric("splitserve_kv_transfer_bytes_total", entry["api_url"])
        assert sent > 0   # the KV of those requests came from the restarted worker
        # Its predecessor's shared-memory KV did not outlive it.
        assert old_kv_files and not any(f.exists() for f in old_kv_files)
        workers = sorted(srv.cluster()["workers"], key=lambda w: w["id"])
        assert [w["restarts"] for w in workers] == [1, 0, 1]
        for w in workers:   # nothing left pinned or reserved anywhere
            assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0, url=w["api_url"]) == 0
    finally:
        assert srv.stop() == 0


def test_a_worker_that_keeps_crashing_stops_serve_naming_it(tmp_path):
    # A real failure mode: its model cannot load, so every start exits 1.
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve", "serve", "--aggregated", "--model",
             str(tmp_path / "no-such-model"), "--port", "0", "--max-restarts", "1",
             "--restart-window", "120"], stdout=out, stderr=subprocess.STDOUT)
    try:
        assert proc.wait(120) == 1
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert "restarting it in 1.0s (restart 1 of at most 1 within 120s)" in text
    restarted = int(text.split("restarted worker (restart 1): pid ")[1].split()[0])
    assert (f"ERROR [serve] splitserve.cli.serve_cmd: worker (pid {restarted}) exited with code 1; "
            f"it exited 2 times within 120s (exit codes: 1, 1), more than the 1 restarts allowed "
            f"(--max-restarts/--restart-window); stopping everything") in text
