"""The swap point for moving BLOCKS payloads. Control frames always use the Channel.

A transport (a sender on P, a receiver on D) lives for one connection and works on the local KV (`KVBlocks`).
P calls `send_blocks`, D calls `recv_blocks`; both move bytes in `chunk_bytes` pieces
and hash each piece right after it moved, while it is still in cache, so verification
costs almost no extra memory traffic. Other transports (CUDA staging, NIXL/UCX RDMA)
implement the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from splitserve.transfer.kvmem import KVBlocks
from splitserve.transfer.protocol import Blocks, Channel


class _Side:
    name: str

    def __init__(self, blocks: KVBlocks, chunk_bytes: int):
        self.blocks = blocks
        self.chunk_bytes = chunk_bytes

    def close(self) -> None:
        """Owner thread, after no send/recv can run any more: free resources."""


class BlockSender(_Side, ABC):
    """P's half of a transport."""

    @abstractmethod
    def send_blocks(self, ch: Channel, request_id: str, first_block: int,
                    ids: list[int]) -> int:
        """Send logical blocks first_block.. held in local physical blocks `ids`; return
        the payload byte count. Blocks until the payload is handed off."""

    def frames_answered(self, count: int) -> None:
        """D answered `count` more BLOCKS frames (by ACK or NACK), in order."""

    def abort(self) -> None:
        """Any thread: wake a `send_blocks` waiting for resources; the connection is over."""


class BlockReceiver(_Side, ABC):
    """D's half of a transport."""

    @abstractmethod
    def recv_blocks(self, ch: Channel, msg: Blocks, payload_len: int, ids: list[int]) -> int:
        """Land the payload announced by `msg` in local physical blocks `ids` (the caller
        checked they are the reservation's and that msg.nbytes fits them exactly); return
        the xxh3_64 of the bytes that landed. Raises ProtocolError if the announcement
        breaks this transport's own bounds."""


def chunks(views: list[memoryview], chunk: int):
    """Split views into pieces of at most `chunk` bytes, in order."""
    for v in views:
        for off in range(0, len(v), chunk):
            yield v[off:off + chunk]
