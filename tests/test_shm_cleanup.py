"""Shared-memory KV files outlive a SIGKILLed prefill worker in /dev/shm; the next KV
server to start removes them, and never a file whose owner is alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from splitserve.transfer import KVTransferServer, TransferConfig, kv_fingerprint
from splitserve.transfer.shmfile import PREFIX, remove_stale_files
from splitserve.transfer.synthetic import SyntheticBackend, make_kv

# A process that allocates shared KV and a ring as a prefill worker does, prints their
# paths and lives on.
_OWNER = """
import sys, time, torch
from splitserve.transfer.shmfile import Ring, allocate_shared_kv, shared_kv_file
kv = allocate_shared_kv((4, 1024), torch.float32)
ring = Ring(4096)
print(shared_kv_file(kv)[0], ring.path, flush=True)
time.sleep(120)
"""


def _owner() -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    paths = proc.stdout.readline().split()
    assert len(paths) == 2 and all(os.path.basename(p).startswith(f"{PREFIX}{proc.pid}-")
                                   for p in paths), paths
    return proc, paths


def _start_server() -> None:
    """Start a KV server (which clears what dead servers left) and stop it again."""
    kv = make_kv(8)
    server = KVTransferServer(kv, kv_fingerprint(kv), TransferConfig(transport="shm"),
                              SyntheticBackend(kv))
    server.start()
    server.close()


def test_a_killed_owners_files_go_when_a_kv_server_starts_and_a_live_owners_stay():
    dead, dead_paths = _owner()
    live, live_paths = _owner()
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert all(os.path.exists(p) for p in dead_paths)   # tmpfs keeps them: nobody unlinks
        _start_server()
        assert not any(os.path.exists(p) for p in dead_paths)
        assert all(os.path.exists(p) for p in live_paths)
    finally:
        live.kill()
        live.wait()
    remove_stale_files()
    assert not any(os.path.exists(p) for p in live_paths)


def test_an_unlocked_file_is_kept_only_while_its_named_process_could_be_creating_it(tmp_path):
    # Between O_CREAT and flock a live owner's file is unlocked: a file named after a live
    # process that is older than the file is kept.
    (tmp_path / f"{PREFIX}{os.getpid()}-creating").touch()
    # A pid reused by a process younger than the file does not protect it.
    younger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reused = tmp_path / f"{PREFIX}{younger.pid}-reused"
        reused.touch()
        os.utime(reused, (time.time() - 30, time.time() - 30))
        # Not this naming at all: never touched.
        (tmp_path / "splitserve-kv-notapid").touch()
        (tmp_path / "other-file").touch()
        assert remove_stale_files(str(tmp_path)) == [str(reused)]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"{PREFIX}{os.getpid()}-creating", "splitserve-kv-notapid", "other-file"])
    finally:
        younger.kill()
        younger.wait()
