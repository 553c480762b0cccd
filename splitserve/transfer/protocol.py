"""KV transfer wire protocol: length-prefixed frames with a typed msgpack header.

Frame = PREFIX | header | payload
  PREFIX  = magic b"SSKV", u16 version, u16 reserved (0), u32 header_len, u64 payload_len
            (network byte order, 20 bytes)
  header  = one msgspec/msgpack `Msg` struct (tagged union, tag field "type")
  payload = raw KV block bytes; only BLOCKS frames over TCP carry one.

Every length the peer sends is checked against a bound *before* anything is read or
allocated: the header against `max_header`, the payload by the caller against the
reservation it was given (a BLOCKS payload is received straight into KV memory, never into
a buffer sized by the peer). The version is checked on every frame, so the very first
frame from a peer speaking another version is refused with a message naming both.

Handshake (D connects, D speaks first), v2:
  D -> HELLO{version, nonce_d}
  P -> CHALLENGE{nonce_p, proof_p=HMAC(secret, "P"|nonce_d|nonce_p), auth_required}
  D -> SESSION{fingerprint, transports, host_id, proof_d=HMAC(secret, "D"|nonce_p|nonce_d)}
  P -> HELLO_OK{fingerprint, transport, ack_every, shm...} | REFUSE{code, reason}
  D -> PREFILL{request_id, token ids, typed first-token sampling, blocks, resume point}
  P -> PROGRESS{queue position, tokens ahead, tokens done} at once, then BLOCKS/PROGRESS/DONE
Authentication comes before anything that reveals or costs something: until D's proof
checked out, P reads only frames of at most `HANDSHAKE_MAX_HEADER` bytes and a refusal
names no fingerprint. Every BLOCKS frame is answered, in order, by a NACK or by being
counted in an ACK; D batches ACKs (`ack_every`) because on loopback each tiny reply costs
a cross-process wake-up that measured as much as copying a 5 MiB block.

Liveness runs both ways: D heartbeats P (renewing P's lease on the request), P sends a
PROGRESS at least every heartbeat interval even while the request waits in its queue, so
D's stall timer measures P's *silence*, never how busy P is. A D that gives up on a
request says CANCEL, and P drops it: not started if still queued, stopped at the next
chunk if running.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Annotated, Callable, Union

import msgspec

from splitserve.sampling_params import MAX_LOGPROBS, MAX_TOKEN_ID, SamplingParams

VERSION = 3   # 3: PREFILL carries the request's SamplingParams whole
MAGIC = b"SSKV"
PREFIX = struct.Struct("!4sHHIQ")
DEFAULT_MAX_HEADER = 16 << 20  # token ids of a multi-million-token prompt fit
HANDSHAKE_MAX_HEADER = 16 << 10  # HELLO/SESSION: a fingerprint, nonces, a proof
_HEADER_STEP = 64 << 10        # a header buffer grows as bytes arrive, never by a peer's claim

TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Fingerprint = Annotated[dict[Annotated[str, msgspec.Meta(max_length=64)],
                             Annotated[str, msgspec.Meta(max_length=512)]],
                        msgspec.Meta(max_length=64)]


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
    nonce: Annotated[bytes, msgspec.Meta(max_length=64)]


class Challenge(msgspec.Struct, tag="challenge"):
    nonce: bytes
    proof: bytes                 # HMAC(secret, "P"|nonce_d|nonce_p), empty without a secret
    auth_required: bool          # P has a secret: D's SESSION must prove it knows it


class Session(msgspec.Struct, tag="session"):
    fingerprint: Fingerprint
    transports: Annotated[list[Annotated[str, msgspec.Meta(max_length=16)]],
                          msgspec.Meta(max_length=8)]
    host_id: Annotated[str, msgspec.Meta(max_length=512)]
    proof: Annotated[bytes, msgspec.Meta(max_length=64)] = b""


class HelloOk(msgspec.Struct, tag="hello_ok"):
    version: int
    fingerprint: dict[str, str]
    transport: str
    ack_every: int                # D answers BLOCKS frames in batches of this many
    shm_path: str = ""
    shm_bytes: int = 0


class Refuse(msgspec.Struct, tag="refuse"):
    code: str                    # version | fingerprint | auth | transport | unknown_request | bad_request
    reason: str


class FirstTokenLogprobs(msgspec.Struct, forbid_unknown_fields=True):
    """The first token's log-probability and the top (token id, logprob) pairs, most
    likely first, as P's engine computed them (the engine's TokenLogprobs on the wire)."""

    logprob: float
    top: Annotated[list[tuple[TokenId, float]], msgspec.Meta(max_length=MAX_LOGPROBS)] = []


class Prefill(msgspec.Struct, tag="prefill"):
    request_id: RequestId
    token_ids: list[TokenId]
    sampling: SamplingParams    # the whole request's: P samples the first token
    num_blocks: Count
    resume_from_block: Count


class Blocks(msgspec.Struct, tag="blocks"):
    request_id: str
    first_block: int             # logical block index within the request
    num_blocks: int
    nbytes: int
    checksum: int                # xxh3_64 of the payload bytes in logical order
    shm_offsets: list[int] = []  # shm transport: each block's byte offset in the shared file


class Progress(msgspec.Struct, tag="progress"):
    """P's word that it is alive and where the request stands: queued behind
    `queue_position` others with `tokens_ahead` prompt tokens still to compute before it
    (0 and 0 once it runs), `tokens_done` of `tokens_total` computed."""

    request_id: str
    tokens_done: int
    tokens_total: int
    queue_position: int = 0
    tokens_ahead: int = 0


class Done(msgspec.Struct, tag="done"):
    request_id: str
    first_token: int
    num_blocks: int
    first_logprobs: FirstTokenLogprobs | None = None   # when PREFILL asked for logprobs


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


class Cancel(msgspec.Struct, tag="cancel"):
    """D gave up on the request (timeout, client gone): P must not compute it any more."""

    request_id: str
    reason: Annotated[str, msgspec.Meta(max_length=1024)]


class Error(msgspec.Struct, tag="error"):
    reason: str


Msg = Union[Hello, Challenge, Session, HelloOk, Refuse, Prefill, Blocks, Progress, Done, Ack,
            Nack, Heartbeat, Release, Cancel, Error]

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
        head = bytearray()
        while len(head) < head_len:
            # Grown by what arrived, not allocated by what the peer claims: a header
            # announced as megabytes costs only the bytes actually sent.
            piece = bytearray(min(_HEADER_STEP, head_len - len(head)))
            self.recv_into(memoryview(piece))
            head += piece
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
