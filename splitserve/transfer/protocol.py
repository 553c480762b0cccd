"""KV transfer wire protocol: length-prefixed frames with a typed msgpack header.

Frame = PREFIX | header | payload
  PREFIX  = magic b"SSKV", u16 version, u16 reserved (0), u32 header_len, u64 payload_len
            (network byte order, 20 bytes)
  header  = one msgspec/msgpack `Msg` struct (tagged union, tag field "t")
  payload = raw KV block bytes; only BLOCKS frames over TCP carry one.

Every length the peer sends is checked against a bound *before* anything is read or
allocated: the header against `max_header`, the payload by the caller against the
reservation it was given (a BLOCKS payload is received straight into KV memory, never into
a buffer sized by the peer). The version is checked on every frame, so the very first
frame from a peer speaking another version is refused with a message naming both.

Handshake (D connects, D speaks first):
  D -> HELLO{version, fingerprint, nonce_d, transports, host_id}
  P -> HELLO_OK{fingerprint, nonce_p, proof_p, transport, shm...} | REFUSE{code, reason}
  D -> PREFILL{..., auth=HMAC(secret, "D"|nonce_p|nonce_d)}
Every BLOCKS frame is answered, in order, by a NACK or by being counted in an ACK; D
batches ACKs (`ack_every`) because on loopback each tiny reply costs a cross-process
wake-up that measured as much as copying a 5 MiB block.
The proof D sends must cover a nonce P chose, so it rides on PREFILL (the first frame after
P's nonce is known) rather than on HELLO; a recorded HELLO/PREFILL cannot be replayed.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Callable, Union

import msgspec

VERSION = 1
MAGIC = b"SSKV"
PREFIX = struct.Struct("!4sHHIQ")
DEFAULT_MAX_HEADER = 16 << 20  # token ids of a multi-million-token prompt fit


class ProtocolError(Exception):
    """The peer sent something this side must not act on (bad magic, bounds, order)."""


class VersionMismatch(ProtocolError):
    def __init__(self, peer_version: int):
        super().__init__(f"protocol version mismatch: this side speaks v{VERSION}, "
                         f"peer sent v{peer_version}")
        self.peer_version = peer_version


class PeerClosed(ConnectionError):
    """EOF from the peer (orderly close or a crash: the kernel cannot tell them apart)."""


class Hello(msgspec.Struct, tag="hello"):
    version: int
    fingerprint: dict[str, str]
    nonce: bytes
    transports: list[str]
    host_id: str


class HelloOk(msgspec.Struct, tag="hello_ok"):
    version: int
    fingerprint: dict[str, str]
    nonce: bytes
    proof: bytes                 # HMAC(secret, "P"|nonce_d|nonce_p), empty without a secret
    transport: str
    ack_every: int                # D answers BLOCKS frames in batches of this many
    shm_path: str = ""
    shm_bytes: int = 0


class Refuse(msgspec.Struct, tag="refuse"):
    code: str                    # version | fingerprint | auth | transport | unknown_request | bad_request
    reason: str


class Prefill(msgspec.Struct, tag="prefill"):
    request_id: str
    token_ids: list[int]
    sampling: dict[str, Any]
    num_blocks: int
    resume_from_block: int
    auth: bytes = b""


class Blocks(msgspec.Struct, tag="blocks"):
    request_id: str
    first_block: int             # logical block index within the request
    num_blocks: int
    nbytes: int
    checksum: int                # xxh3_64 of the payload bytes in logical order
    shm_offsets: list[int] = []  # shm transport: each block's byte offset in the shared file


class Progress(msgspec.Struct, tag="progress"):
    request_id: str
    tokens_done: int
    tokens_total: int


class Done(msgspec.Struct, tag="done"):
    request_id: str
    first_token: int
    num_blocks: int


class Ack(msgspec.Struct, tag="ack"):
    request_id: str
    blocks_verified_upto: int    # every logical block < this arrived with a good checksum
    frames: int = 1              # BLOCKS frames this ACK answers (a NACK answers one)


class Nack(msgspec.Struct, tag="nack"):
    request_id: str
    first_block: int
    num_blocks: int


class Heartbeat(msgspec.Struct, tag="heartbeat"):
    request_id: str


class Release(msgspec.Struct, tag="release"):
    request_id: str


class Error(msgspec.Struct, tag="error"):
    reason: str


Msg = Union[Hello, HelloOk, Refuse, Prefill, Blocks, Progress, Done, Ack, Nack, Heartbeat,
            Release, Error]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Msg)


def encode_head(msg: Msg, payload_len: int = 0) -> bytes:
    """PREFIX + header of one frame; the caller sends `payload_len` raw bytes after it."""
    head = _encoder.encode(msg)
    return PREFIX.pack(MAGIC, VERSION, 0, len(head), payload_len) + head


class Channel:
    """One framed, blocking socket. Tracks the last time bytes moved each way.

    With a socket timeout set, `on_idle` is called every time a receive waits that long
    without data; it may send (heartbeats) or raise (stall detection). A partial frame
    survives the timeout: receiving simply continues where it stopped.
    """

    def __init__(self, sock: socket.socket, max_header: int = DEFAULT_MAX_HEADER,
                 on_idle: Callable[[], None] | None = None):
        self.sock = sock
        self.max_header = max_header
        self.on_idle = on_idle
        self.last_rx = self.last_tx = time.monotonic()
        self._prefix = bytearray(PREFIX.size)

    def send(self, msg: Msg) -> None:
        self.sock.sendall(encode_head(msg))
        self.last_tx = time.monotonic()

    def send_with_payload(self, msg: Msg, payload: list[memoryview], nbytes: int) -> None:
        """Header and payload in as few syscalls as possible, straight from `payload` memory."""
        send_all(self.sock, [encode_head(msg, nbytes), *payload])
        self.last_tx = time.monotonic()

    def recv_into(self, view: memoryview) -> None:
        """Fill `view` exactly (it may be KV memory: no intermediate buffer)."""
        got, n = 0, len(view)
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except socket.timeout:
                if self.on_idle is None:
                    raise
                self.on_idle()
                continue
            if k == 0:
                raise PeerClosed("peer closed the connection")
            got += k
            self.last_rx = time.monotonic()

    def recv(self) -> tuple[Msg, int]:
        """Next frame's header and its announced payload length (payload not yet read)."""
        self.recv_into(memoryview(self._prefix))
        magic, version, _reserved, head_len, payload_len = PREFIX.unpack(self._prefix)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {bytes(magic)!r} (not a splitserve KV peer?)")
        if version != VERSION:
            raise VersionMismatch(version)
        if head_len == 0 or head_len > self.max_header:
            raise ProtocolError(f"frame header length {head_len} outside 1..{self.max_header}")
        head = bytearray(head_len)
        self.recv_into(memoryview(head))
        try:
            msg = _decoder.decode(head)
        except msgspec.DecodeError as e:
            raise ProtocolError(f"undecodable frame header: {e}") from None
        if payload_len and not isinstance(msg, Blocks):
            raise ProtocolError(f"{type(msg).__name__} frame must not carry a payload "
                                f"({payload_len} bytes announced)")
        return msg, payload_len


def send_all(sock: socket.socket, bufs: list) -> None:
    """sendmsg until every buffer is out; handles partial sends across buffer boundaries."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        sent = sock.sendmsg(views[:1024])  # IOV_MAX
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
        while views and len(views[0]) == 0:
            views.pop(0)
