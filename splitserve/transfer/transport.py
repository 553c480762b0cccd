"""The swap point for moving BLOCKS payloads. Control frames always use the Channel.

A transport instance lives for one connection. P calls `send_blocks`, D calls
`recv_blocks`; both move bytes in `chunk_bytes` pieces and hash each piece right after
it moved, while it is still in cache, so verification costs almost no extra memory
traffic. Other transports (CUDA staging, NIXL/UCX RDMA) implement the same three methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from splitserve.transfer.protocol import Blocks, Channel


class Transport(ABC):
    name: str

    @abstractmethod
    def send_blocks(self, ch: Channel, request_id: str, first_block: int, num_blocks: int,
                    src: list[memoryview]) -> int:
        """P: send logical blocks [first_block, first_block + num_blocks) whose bytes are
        `src` (in order); return the payload byte count. Blocks until the payload is handed off."""

    @abstractmethod
    def recv_blocks(self, ch: Channel, msg: Blocks, payload_len: int,
                    dest: list[memoryview]) -> int:
        """D: land the payload announced by `msg` in `dest` (already bounds-checked KV
        views of exactly msg.nbytes bytes); return the xxh3_64 of the bytes that landed.
        Raises ProtocolError if the announcement does not fit this transport's bounds."""

    def frame_answered(self) -> None:
        """P: D answered one more BLOCKS frame (ACK or NACK), in order."""

    def abort(self) -> None:
        """Any thread: wake a `send_blocks` waiting for resources; the connection is over."""

    def close(self) -> None:
        """Owner thread, after no send/recv can run any more: free resources."""


def chunks(views: list[memoryview], chunk: int):
    """Split views into pieces of at most `chunk` bytes, in order."""
    for v in views:
        for off in range(0, len(v), chunk):
            yield v[off:off + chunk]
