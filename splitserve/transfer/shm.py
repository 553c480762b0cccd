"""Shared-memory transport for P and D on one host: each side does one memcpy.

P owns a ring file in /dev/shm (mode 0600, random name) cut into slots of one maximal
BLOCKS frame. P copies KV -> slot and sends a BLOCKS header naming the slot's offset over
the socket; D copies slot -> reserved KV blocks. Every BLOCKS frame is answered by exactly
one ACK or NACK, in order, so P frees slots FIFO on answers: that is the flow control.
D maps the ring read-only and bounds-checks every offset against the ring's size, so a
bad header can neither read outside the ring nor write outside the reservation.
P unlinks the file as soon as D has mapped it (after PREFILL), so a crash leaks nothing.
"""

from __future__ import annotations

import mmap
import os
import secrets
import tempfile
import threading

import xxhash

from splitserve.transfer.protocol import Blocks, Channel, ProtocolError
from splitserve.transfer.transport import Transport, chunks


def _ring_dir() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class ShmTransport(Transport):
    name = "shm"

    def __init__(self, path: str, mm: mmap.mmap, chunk_bytes: int, slot_bytes: int = 0):
        self.path = path
        self._mm = mm
        self.mem = memoryview(mm)
        self.size = len(mm)
        self.chunk_bytes = chunk_bytes
        self.slot_bytes = slot_bytes
        self.nslots = self.size // slot_bytes if slot_bytes else 0
        self._cond = threading.Condition()
        self._inflight = 0
        self._next = 0
        self._aborted = False

    @classmethod
    def create(cls, slot_bytes: int, ring_bytes: int, chunk_bytes: int) -> "ShmTransport":
        """P side. At least two slots so copying the next frame overlaps D's copy-out."""
        nslots = max(2, ring_bytes // slot_bytes)
        size = nslots * slot_bytes
        path = os.path.join(_ring_dir(), f"splitserve-kv-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, mm, chunk_bytes, slot_bytes)

    @classmethod
    def attach(cls, path: str, size: int, chunk_bytes: int) -> "ShmTransport":
        """D side, read-only. The size must match the file, or P lied about it."""
        if not os.path.basename(path).startswith("splitserve-kv-"):
            raise ProtocolError(f"refusing to map unexpected shm path {path!r}")
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != size or size <= 0:
                raise ProtocolError(f"shm ring {path} is not {size} bytes")
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(path, mm, chunk_bytes)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def send_blocks(self, ch: Channel, request_id: str, first_block: int, num_blocks: int,
                    src: list[memoryview]) -> int:
        with self._cond:
            while self._inflight >= self.nslots and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise ConnectionError("connection closed while waiting for a ring slot")
            slot, self._next = self._next, (self._next + 1) % self.nslots
            self._inflight += 1
        off = pos = slot * self.slot_bytes
        h = xxhash.xxh3_64()
        for piece in chunks(src, self.chunk_bytes):
            dst = self.mem[pos:pos + len(piece)]
            dst[:] = piece
            h.update(dst)
            pos += len(piece)
        nbytes = pos - off
        if nbytes > self.slot_bytes:
            raise ValueError(f"frame of {nbytes} bytes exceeds ring slot {self.slot_bytes}")
        ch.send(Blocks(request_id, first_block, num_blocks, nbytes, h.intdigest(), off))
        return nbytes

    def recv_blocks(self, ch: Channel, msg: Blocks, payload_len: int,
                    dest: list[memoryview]) -> int:
        if payload_len != 0:
            raise ProtocolError(f"shm BLOCKS frame carries a {payload_len}-byte socket payload")
        if msg.shm_offset < 0 or msg.shm_offset + msg.nbytes > self.size:
            raise ProtocolError(f"shm offset {msg.shm_offset}+{msg.nbytes} outside ring of "
                                f"{self.size} bytes")
        h = xxhash.xxh3_64()
        pos = msg.shm_offset
        for piece in chunks(dest, self.chunk_bytes):
            piece[:] = self.mem[pos:pos + len(piece)]
            h.update(piece)
            pos += len(piece)
        return h.intdigest()

    def frame_answered(self) -> None:
        with self._cond:
            self._inflight = max(0, self._inflight - 1)
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def close(self) -> None:
        self.abort()
        self.mem.release()
        self._mm.close()
        if self.slot_bytes:
            self.unlink()
