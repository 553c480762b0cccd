"""Shared-memory transport for P and D on one host (files and mappings: shmfile.py).

BLOCKS headers travel over the socket and name, per block, its byte offset in a shared
file that D maps read-only; D copies each block into its reservation, hashing as it goes.
The file is either
- P's KV itself (`allocate_shared_kv`, our engine's one-plane pool): P copies nothing,
  one copy in total; the offsets are where each block lies in P's KV; or
- a staging ring: P copies the frame's payload (plane-major, kvmem.py) into a ring slot
  first; the offsets then name consecutive blocks' worth of that payload, which D copies
  in payload order, so any plane layout on either side works. Every BLOCKS frame is answered by a
  NACK or counted in an ACK, in order, so P frees slots FIFO on answers: that is the
  flow control.
D checks every offset against the file size, so a bad header can neither make D read
outside the file nor write outside the reservation.
"""

from __future__ import annotations

import threading

import xxhash

from splitserve.transfer.kvmem import KVBlocks
from splitserve.transfer.protocol import Blocks, Channel, ProtocolError
from splitserve.transfer.shmfile import RingPool, map_readonly
from splitserve.transfer.transport import BlockReceiver, BlockSender, chunks


class ShmSender(BlockSender):
    """P side."""

    name = "shm"

    def __init__(self, blocks: KVBlocks, chunk_bytes: int, shared_kv: tuple[str, int] | None,
                 pool: RingPool):
        super().__init__(blocks, chunk_bytes)
        self._pool = pool
        self.ring = None if shared_kv else pool.acquire()
        self.path, self.size = shared_kv or (self.ring.path, self.ring.size)
        self.nslots = self.size // pool.slot_bytes
        self._cond = threading.Condition()
        self._inflight = 0
        self._next = 0
        self._aborted = False

    def send_blocks(self, ch: Channel, request_id: str, first_block: int,
                    ids: list[int]) -> int:
        bn = self.blocks.block_nbytes
        h = xxhash.xxh3_64()
        if self.ring is None:
            for v in self.blocks.views(ids):
                h.update(v)
            offsets = [b * bn for b in ids]
        else:
            offsets = self._stage(ids, h)
        nbytes = len(ids) * bn
        ch.send(Blocks(request_id, first_block, len(ids), nbytes, h.intdigest(), offsets))
        return nbytes

    def _stage(self, ids: list[int], h) -> list[int]:
        with self._cond:
            while self._inflight >= self.nslots and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise ConnectionError("connection closed while waiting for a ring slot")
            slot, self._next = self._next, (self._next + 1) % self.nslots
            self._inflight += 1
        bn, mem, step = self.blocks.block_nbytes, self.ring.mem, self.chunk_bytes
        base = slot * self._pool.slot_bytes
        pos = base
        for v in self.blocks.views(ids):
            for off in range(0, len(v), step):
                piece = v[off:off + step]
                dst = mem[pos:pos + len(piece)]
                dst[:] = piece
                h.update(dst)
                pos += len(piece)
        return [base + i * bn for i in range(len(ids))]

    def frames_answered(self, count: int) -> None:
        with self._cond:
            self._inflight = max(0, self._inflight - count)
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def close(self) -> None:
        self.abort()
        if self.ring is not None:
            # NOTE: a D may still map this ring; reuse is safe because each D reads only
            # the slots its own connection's headers name, and verifies what it copied.
            self._pool.give_back(self.ring)


class ShmReceiver(BlockReceiver):
    """D side."""

    name = "shm"

    def __init__(self, blocks: KVBlocks, chunk_bytes: int, path: str, size: int):
        super().__init__(blocks, chunk_bytes)
        self.mem = map_readonly(path, size)
        self.size = size

    def recv_blocks(self, ch: Channel, msg: Blocks, payload_len: int, ids: list[int]) -> int:
        bn, step = self.blocks.block_nbytes, self.chunk_bytes
        if payload_len != 0 or len(msg.shm_offsets) != len(ids):
            raise ProtocolError(f"shm BLOCKS frame with a {payload_len}-byte socket payload "
                                f"and {len(msg.shm_offsets)} offsets for {len(ids)} blocks")
        for off in msg.shm_offsets:
            if not 0 <= off <= self.size - bn:
                raise ProtocolError(f"shm offset {off} (+{bn}) outside file of {self.size} bytes")
        h = xxhash.xxh3_64()
        off0 = msg.shm_offsets[0]
        if all(off == off0 + i * bn for i, off in enumerate(msg.shm_offsets)):
            # One run of payload (a ring slot): copy it in payload order.
            pos = off0
            for dst in chunks(self.blocks.views(ids), step):
                dst[:] = self.mem[pos:pos + len(dst)]
                h.update(dst)
                pos += len(dst)
            return h.intdigest()
        kv = self.blocks.mem
        if kv is None:
            raise ProtocolError("shm BLOCKS with scattered offsets for a multi-plane KV")
        for off, b in zip(msg.shm_offsets, ids):
            for k in range(0, bn, step):
                n = min(step, bn - k)
                dst = kv[b * bn + k:b * bn + k + n]
                dst[:] = self.mem[off + k:off + k + n]
                h.update(dst)
        return h.intdigest()
