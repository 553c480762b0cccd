"""TCP transport: the payload follows its BLOCKS header on the same socket.

P: hash the source blocks, then one sendmsg of [prefix+header, *block views] straight from
KV memory (the kernel's copy into socket buffers is the only copy on P).
D: recv_into straight into the reserved KV blocks, hashing each chunk as it lands.
"""

from __future__ import annotations

import xxhash

from splitserve.transfer.protocol import Blocks, Channel, ProtocolError
from splitserve.transfer.transport import BlockReceiver, BlockSender, chunks


class TcpTransport(BlockSender, BlockReceiver):
    name = "tcp"

    def send_blocks(self, ch: Channel, request_id: str, first_block: int,
                    ids: list[int]) -> int:
        src = self.blocks.views(ids)
        h = xxhash.xxh3_64()
        for v in src:
            h.update(v)
        nbytes = len(ids) * self.blocks.block_nbytes
        ch.send_with_payload(Blocks(request_id, first_block, len(ids), nbytes, h.intdigest()),
                             src, nbytes)
        return nbytes

    def recv_blocks(self, ch: Channel, msg: Blocks, payload_len: int, ids: list[int]) -> int:
        if payload_len != msg.nbytes:
            raise ProtocolError(f"BLOCKS announces {msg.nbytes} bytes but frame carries "
                                f"{payload_len}")
        h = xxhash.xxh3_64()
        for piece in chunks(self.blocks.views(ids), self.chunk_bytes):
            ch.recv_into(piece)
            h.update(piece)
        return h.intdigest()
