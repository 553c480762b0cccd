"""Shared-memory files for the shm transport: P's rings, P's shared KV, D's mappings.

All files live in /dev/shm (mode 0600, name `splitserve-kv-<pid>-<random>`); D maps only
files with that prefix in that directory, read-only.

- `allocate_shared_kv(shape, dtype)`: the engine on P allocates its KV cache here; then
  D copies blocks straight out of P's KV (one copy in total, P only hashes and sends
  headers). Pinned blocks stay put under the lease, which is what makes this safe.
- `RingPool`: otherwise P stages blocks through a ring (one copy on each side). Rings are
  reused across connections and pre-faulted once: first-touching fresh tmpfs pages costs
  more than copying them (~0.25 GB/s measured here).
- `map_readonly`: D caches its mappings by (path, inode, size), so each page is faulted
  into D once per process lifetime, not once per request.

Files outlive a SIGKILLed owner (tmpfs has no owner to clean up after), so each owner
holds a shared flock on its file until it unlinks it, and `remove_stale_files` (run when
a RingPool is made, i.e. when a KV server starts) removes every file whose lock it can
take: nobody holds it, so its owner is gone, whatever became of its pid.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import tempfile
import threading
from collections import OrderedDict

import torch

from splitserve.transfer.protocol import ProtocolError

logger = logging.getLogger(__name__)

PREFIX = "splitserve-kv-"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def shm_dir() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _create(size: int) -> tuple[str, int, mmap.mmap]:
    """A new file of `size` bytes, mapped read-write; its fd holds the owner's lock and
    must stay open until the file is unlinked (_remove)."""
    path = os.path.join(shm_dir(), f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.ftruncate(fd, size)
        return path, fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
    except BaseException:
        _remove(path, fd)
        raise


def _remove(path: str, fd: int) -> None:
    """Unlink, then let go of the lock: the file is never visible without its owner's lock."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


def _started_at(pid: int) -> float | None:
    """Wall-clock start time of process `pid` (to within 1 s), None if there is none."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    if fields[0] == "Z":
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")   # field 22: starttime in ticks


def remove_stale_files(directory: str | None = None) -> list[str]:
    """Remove the shm files of owners that are gone; the paths removed.

    A file is stale when its lock can be taken. One exception: between O_CREAT and flock
    a live owner has not locked its file yet, so a file whose named pid is alive and
    started before the file's mtime is kept. A pid reused since (a younger process) does
    not protect a file. mtime is set at creation; writes through the mapping can only
    move it later, which errs towards keeping a file."""
    directory = directory or shm_dir()
    removed = []
    for name in os.listdir(directory):
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not name.startswith(PREFIX) or not pid.isdigit():
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue    # gone meanwhile, or not ours to touch
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            started = _started_at(int(pid))
            if started is not None and started <= os.fstat(fd).st_mtime + 1.0:
                continue
            os.unlink(path)
            removed.append(path)
        except BlockingIOError:
            continue    # its owner holds the lock
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
    return removed


class Ring:
    """A P-side staging ring: one file, mapped read-write."""

    def __init__(self, size: int):
        self.path, self._fd, self._mm = _create(size)
        self.size = size
        self.mem = memoryview(self._mm)

    def destroy(self) -> None:
        self.mem.release()
        self._mm.close()
        _remove(self.path, self._fd)


class RingPool:
    """Rings kept for reuse, at most `keep` idle ones; all unlinked on close(). Made when a
    KV server starts, so it first removes what dead servers left (remove_stale_files)."""

    def __init__(self, slot_bytes: int, ring_bytes: int, keep: int = 4):
        for path in remove_stale_files():
            logger.info("removed %s: its owner is gone", path)
        # At least two slots so copying the next frame overlaps D's copy-out.
        self.size = max(2, ring_bytes // slot_bytes) * slot_bytes
        self.slot_bytes = slot_bytes
        self.keep = keep
        self._idle: list[Ring] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> Ring:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Ring(self.size)

    def give_back(self, ring: Ring) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.keep:
                self._idle.append(ring)
                return
        ring.destroy()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for ring in idle:
            ring.destroy()


_SHARED: dict[int, tuple[str, int, int]] = {}   # data_ptr -> (path, size, fd) of shared KV tensors


def allocate_shared_kv(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed KV tensor backed by a shared-memory file that same-host D workers can map.

    NOTE: the tensor keeps the mapping alive; call `free_shared_kv` to remove the name.
    """
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    path, fd, mm = _create(size)
    kv = torch.frombuffer(mm, dtype=dtype).view(shape)
    _SHARED[kv.data_ptr()] = (path, size, fd)
    return kv


def shared_kv_file(kv: torch.Tensor) -> tuple[str, int] | None:
    entry = _SHARED.get(kv.data_ptr())
    return None if entry is None else entry[:2]


def free_shared_kv(kv: torch.Tensor) -> None:
    entry = _SHARED.pop(kv.data_ptr(), None)
    if entry is not None:
        _remove(entry[0], entry[2])


_MAPS: OrderedDict[tuple[str, int, int], memoryview] = OrderedDict()
_MAPS_LOCK = threading.Lock()
_MAPS_KEEP = 64


def map_readonly(path: str, size: int) -> memoryview:
    """D side: a read-only view of a P shm file, cached across sessions."""
    if not os.path.basename(path).startswith(PREFIX) or os.path.dirname(path) != shm_dir():
        raise ProtocolError(f"refusing to map unexpected shm path {path!r}")
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size != size or size <= 0:
            raise ProtocolError(f"shm file {path} is {st.st_size} bytes, peer said {size}")
        key = (path, st.st_ino, size)
        with _MAPS_LOCK:
            if key in _MAPS:
                _MAPS.move_to_end(key)
                return _MAPS[key]
            view = memoryview(mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ))
            _MAPS[key] = view
            if len(_MAPS) > _MAPS_KEEP:
                # Dropped, not closed: a session still copying from it keeps it alive.
                _MAPS.popitem(last=False)
            return view
    finally:
        os.close(fd)
