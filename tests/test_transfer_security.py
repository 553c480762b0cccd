"""Handshake refusals and hostile peers: nothing is misread, nothing outside the reservation
is written, and a bad peer cannot take the server down."""

import contextlib
import socket
import struct
import threading
import time

import msgspec
import pytest

from splitserve.sampling_params import SamplingParams
from splitserve.transfer import (KVTransferServer, Outcome, PrefillRequest, TransferConfig,
                                 TransferStats, fetch_kv, kv_fingerprint)
from splitserve.transfer import protocol as proto
from splitserve.transfer.shmfile import Ring
from splitserve.transfer.synthetic import SyntheticBackend, make_kv, mismatched_blocks

NB = 8192
FAST = dict(stall_timeout=1.0, lease=2.0, heartbeat_interval=0.2, reconnect_attempts=0)


def request(rid="r", num_blocks=4):
    return PrefillRequest(rid, list(range(num_blocks * 16)), SamplingParams(), num_blocks)


def handshake(sock, fp, secret_proof=b""):
    """An honest D's handshake up to HELLO_OK; returns (channel, reply to SESSION)."""
    ch = proto.Channel(sock)
    ch.send(proto.Hello(proto.VERSION, b"n" * 16))
    challenge, _ = ch.recv()
    assert isinstance(challenge, proto.Challenge)
    ch.send(proto.Session(fp, ["tcp"], "x", secret_proof))
    return ch, ch.recv()[0]


def test_fingerprint_mismatch_names_both():
    pkv, dkv = make_kv(8), make_kv(8, num_layers=3)
    p_fp = kv_fingerprint(pkv, architecture="LlamaForCausalLM")
    d_fp = kv_fingerprint(dkv, architecture="LlamaForCausalLM")
    cfg = TransferConfig(transport="tcp", **FAST)
    backend = SyntheticBackend(pkv)
    with KVTransferServer(pkv, p_fp, cfg, backend) as server:
        r = fetch_kv(server.address, request(), [0, 1, 2, 3], dkv, cfg, d_fp)
    assert r.outcome is Outcome.MISMATCH
    assert str(p_fp) in r.reason and str(d_fp) in r.reason
    assert "kv_block_shape: '3x2x16x2x32' vs '2x2x16x2x32'" in r.reason or \
           "kv_block_shape: '2x2x16x2x32' vs '3x2x16x2x32'" in r.reason
    assert backend.started == [] and not dkv.any()


@pytest.mark.parametrize("d_secret,why", [("wrong", "auth"), (None, "auth")])
def test_wrong_or_missing_secret_is_refused(d_secret, why):
    pkv, dkv = make_kv(8), make_kv(8)
    fp = kv_fingerprint(pkv)
    backend = SyntheticBackend(pkv)
    with KVTransferServer(pkv, fp, TransferConfig(transport="tcp", secret="s3cret", **FAST),
                          backend) as server:
        r = fetch_kv(server.address, request(), [0, 1, 2, 3], dkv,
                     TransferConfig(transport="tcp", secret=d_secret, **FAST), fp)
        assert r.outcome is Outcome.AUTH_FAILED, r.reason
        ok = fetch_kv(server.address, request("good"), [4, 5, 6, 7], dkv,
                      TransferConfig(transport="tcp", secret="s3cret", **FAST), fp)
        assert ok.outcome is Outcome.OK, ok.reason
    assert backend.started == ["good"] and not dkv[:4].any()


def test_secret_never_crosses_the_wire():
    pkv = make_kv(8)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport="tcp", secret="s3cret", **FAST)
    with KVTransferServer(pkv, fp, cfg, SyntheticBackend(pkv)) as server:
        with socket.create_connection(server.address) as sock:
            ch = proto.Channel(sock)
            ch.send(proto.Hello(proto.VERSION, b"n" * 16))
            challenge, _ = ch.recv()
            assert isinstance(challenge, proto.Challenge) and len(challenge.proof) == 32
            assert challenge.auth_required and b"s3cret" not in msgspec.msgpack.encode(challenge)
            ch.send(proto.Session(fp, ["tcp"], "x", b"x" * 32))
            refuse, _ = ch.recv()
            assert isinstance(refuse, proto.Refuse) and refuse.code == "auth"


def test_with_a_secret_a_refusal_reveals_nothing():
    # A stranger with the wrong fingerprint and no secret learns neither this worker's
    # fingerprint nor why exactly it was refused: authentication comes first.
    pkv = make_kv(8)
    fp = kv_fingerprint(pkv, architecture="LlamaForCausalLM")
    cfg = TransferConfig(transport="tcp", secret="s3cret", **FAST)
    stats = TransferStats()
    with KVTransferServer(pkv, fp, cfg, SyntheticBackend(pkv), stats=stats) as server:
        with socket.create_connection(server.address) as sock:
            _, refuse = handshake(sock, {"architecture": "guess"})
    assert isinstance(refuse, proto.Refuse) and refuse.code == "auth"
    assert refuse.reason == "authentication failed"
    assert stats.auth_failures == 1


def test_other_protocol_version_is_refused_on_first_frame():
    pkv = make_kv(8)
    fp = kv_fingerprint(pkv)
    with KVTransferServer(pkv, fp, TransferConfig(**FAST), SyntheticBackend(pkv)) as server:
        with socket.create_connection(server.address) as sock:
            head = msgspec.msgpack.encode(proto.Hello(99, b"n" * 16))
            sock.sendall(proto.PREFIX.pack(proto.MAGIC, 99, 0, len(head), 0) + head)
            refuse, _ = proto.Channel(sock).recv()
    assert isinstance(refuse, proto.Refuse) and refuse.code == "version"
    assert f"v{proto.VERSION}" in refuse.reason and "v99" in refuse.reason


class EvilPrefill:
    """Completes the handshake honestly, then sends `frames` (raw bytes) to D."""

    def __init__(self, fp, frames, transport="tcp", ring=None):
        self.fp, self.frames, self.transport, self.ring = fp, frames, transport, ring
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = self.lsock.getsockname()[:2]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        sock, _ = self.lsock.accept()
        with sock:
            ch = proto.Channel(sock)
            hello, _ = ch.recv()
            ch.send(proto.Challenge(b"p" * 16, b"", False))
            session, _ = ch.recv()
            ring = self.ring
            ch.send(proto.HelloOk(proto.VERSION, self.fp, self.transport,
                                  ack_every=1, shm_path=ring.path if ring else "",
                                  shm_bytes=ring.size if ring else 0))
            prefill, _ = ch.recv()
            for f in self.frames(prefill):
                try:
                    sock.sendall(f)
                except OSError:
                    return
            with contextlib.suppress(OSError):   # D may reset rather than close
                read_until_closed(sock)


def read_until_closed(sock, timeout=5.0):
    """Read and discard until the peer closes; socket.timeout if it does not in time."""
    sock.settimeout(timeout)
    while sock.recv(1 << 16):
        continue


def frame(msg, payload=b"", payload_len=None):
    head = msgspec.msgpack.encode(msg)
    n = len(payload) if payload_len is None else payload_len
    return proto.PREFIX.pack(proto.MAGIC, proto.VERSION, 0, len(head), n) + head + payload


def blocks(rid, first, k, nbytes=None, payload=None, payload_len=None):
    nbytes = k * NB if nbytes is None else nbytes
    data = b"\xAB" * nbytes if payload is None else payload
    return frame(proto.Blocks(rid, first, k, nbytes, 0), data, payload_len)


EVIL = {
    "block past reservation": lambda p: [blocks(p.request_id, 3, 2)],
    "negative block": lambda p: [blocks(p.request_id, -1, 1)],
    "oversized nbytes": lambda p: [blocks(p.request_id, 0, 1, nbytes=64 * NB)],
    "payload longer than nbytes": lambda p: [blocks(p.request_id, 0, 1, payload_len=1 << 40)],
    "unknown request id": lambda p: [blocks("someone-else", 0, 1)],
    "huge header length": lambda p: [proto.PREFIX.pack(proto.MAGIC, proto.VERSION, 0,
                                                       0x7FFFFFFF, 0)],
    "payload on a control frame": lambda p: [frame(proto.Progress(p.request_id, 1, 2),
                                                   b"\0" * NB)],
    "garbage": lambda p: [b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64],
    "done for other size": lambda p: [frame(proto.Done(p.request_id, 5, 99))],
}


@pytest.mark.parametrize("attack", list(EVIL))
def test_hostile_prefill_cannot_write_outside_reservation(attack):
    dkv = make_kv(16)
    dkv.view(-1).fill_(1.5)                      # a sentinel in every byte of D's KV
    before = dkv.clone()
    fp = kv_fingerprint(dkv)
    evil = EvilPrefill(fp, EVIL[attack])
    dest = [9, 2, 11, 5]
    r = fetch_kv(evil.address, request("victim", 4), dest, dkv,
                 TransferConfig(transport="tcp", **FAST), fp)
    assert r.outcome is Outcome.PROTOCOL_ERROR, r
    assert r.blocks_verified == 0
    assert dkv.equal(before), "D's KV was written"


@pytest.mark.parametrize("offset", [-NB, 2 * NB + 1, 1 << 40])
def test_hostile_shm_offsets_are_bounded(offset):
    dkv = make_kv(16)
    before = dkv.clone()
    fp = kv_fingerprint(dkv)
    ring = Ring(3 * NB)
    msg = lambda p: [frame(proto.Blocks(p.request_id, 0, 2, 2 * NB, 0, [0, offset]))]
    evil = EvilPrefill(fp, msg, transport="shm", ring=ring)
    r = fetch_kv(evil.address, request("victim", 4), [1, 2, 3, 4], dkv,
                 TransferConfig(transport="shm", **FAST), fp)
    ring.destroy()
    assert r.outcome is Outcome.PROTOCOL_ERROR and "outside file" in r.reason
    assert dkv.equal(before)


def test_hostile_prefill_checksum_garbage_never_counts_as_verified():
    dkv = make_kv(16)
    fp = kv_fingerprint(dkv)
    evil = EvilPrefill(fp, lambda p: [blocks(p.request_id, 0, 1)] * 3)  # checksum 0: wrong
    r = fetch_kv(evil.address, request("victim", 4), [1, 2, 3, 4], dkv,
                 TransferConfig(transport="tcp", max_checksum_failures=2, **FAST), fp)
    assert r.outcome is Outcome.CORRUPT and r.checksum_failures == 3
    assert r.blocks_verified == 0
    assert not dkv[5:].any() and not dkv[0].any()


@pytest.mark.parametrize("attack", ["nack unsent", "other request", "huge header", "payload"])
def test_hostile_decode_cannot_hurt_the_server(attack):
    pkv, dkv = make_kv(32), make_kv(32)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport="tcp", **FAST)
    backend = SyntheticBackend(pkv, blocks_per_chunk=1, stall_at_block=2)
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        with socket.create_connection(server.address) as sock:
            ch, _ = handshake(sock, fp)
            ch.send(proto.Prefill("target", list(range(64)), SamplingParams(), 4, 0))
            bad = {"nack unsent": frame(proto.Nack("target", 0, 4)),
                   "other request": frame(proto.Ack("not-mine", 1)),
                   "huge header": struct.pack("!4sHHIQ", proto.MAGIC, proto.VERSION, 0,
                                              1 << 30, 0),
                   "payload": frame(proto.Heartbeat("target"), b"x" * 100)}[attack]
            sock.sendall(bad)
            read_until_closed(sock)     # P drops the session; a timeout here fails
            assert server.jobs() == ["target"]   # the job survives for a legit resume
        # The server still serves honest peers.
        ok_backend_request = PrefillRequest("honest", list(range(16)), SamplingParams(), 1)
        backend.stall_at_block = None
        r = fetch_kv(server.address, ok_backend_request, [7], dkv, cfg, fp)
        assert r.ok, r.reason
        assert mismatched_blocks(dkv, "honest", [7], 1) == []


def _prefill_frame(**fields):
    """A PREFILL header built by hand: any value, typed or not, as a stranger would send it."""
    body = {"type": "prefill", "request_id": "evil", "token_ids": list(range(16)),
            "sampling": {}, "num_blocks": 1, "resume_from_block": 0, **fields}
    return frame_raw(body)


def frame_raw(body: dict) -> bytes:
    head = msgspec.msgpack.encode(body)
    return proto.PREFIX.pack(proto.MAGIC, proto.VERSION, 0, len(head), 0) + head


HOSTILE_PREFILLS = {
    "stop_token_ids of lists": _prefill_frame(sampling={"stop_token_ids": [[1]]}),
    "NaN temperature": _prefill_frame(sampling={"temperature": float("nan")}),
    "infinite top_p": _prefill_frame(sampling={"top_p": float("inf")}),
    "seed 2**64": _prefill_frame(sampling={"seed": 2 ** 64 - 1}),
    "unknown sampling field": _prefill_frame(sampling={"logits_processor": "os.system"}),
    "token id 2**40": _prefill_frame(token_ids=[2 ** 40] * 16),
    "negative token id": _prefill_frame(token_ids=[-1] * 16),
    "request id with a newline": _prefill_frame(request_id="a\nWARNING forged"),
    "huge request id": _prefill_frame(request_id="x" * 10_000),
    "negative block count": _prefill_frame(num_blocks=-1),
    "string tokens": _prefill_frame(token_ids="0123456789abcdef"),
}


def test_a_hand_built_prefill_frame_is_accepted_when_valid():
    # The control for the attacks below: the same frame, unmodified, starts a prefill.
    pkv = make_kv(16)
    fp = kv_fingerprint(pkv)
    backend = SyntheticBackend(pkv)
    with KVTransferServer(pkv, fp, TransferConfig(transport="tcp", **FAST), backend) as server:
        with socket.create_connection(server.address) as sock:
            ch, ok = handshake(sock, fp)
            assert isinstance(ok, proto.HelloOk)
            sock.sendall(_prefill_frame())
            msg, _ = ch.recv()
            assert isinstance(msg, (proto.Progress, proto.Blocks)) and msg.request_id == "evil"
        assert backend.started == ["evil"]


@pytest.mark.parametrize("attack", list(HOSTILE_PREFILLS))
def test_hostile_prefill_frames_are_refused_and_the_server_lives(attack):
    pkv, dkv = make_kv(16), make_kv(16)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport="tcp", **FAST)
    backend = SyntheticBackend(pkv)
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        with socket.create_connection(server.address) as sock:
            ch, ok = handshake(sock, fp)
            assert isinstance(ok, proto.HelloOk)
            sock.sendall(HOSTILE_PREFILLS[attack])
            read_until_closed(sock)          # P closes the session; a timeout fails
        assert backend.started == [] and server.jobs() == []
        r = fetch_kv(server.address, request("honest", 2), [3, 4], dkv, cfg, fp)
        assert r.ok, r.reason
        assert mismatched_blocks(dkv, "honest", [3, 4], 2) == []


def test_header_claims_cost_nothing_before_authentication():
    # Before the peer proved anything, a frame may announce at most a few KiB: a 16 MiB
    # claim is refused at once, before any allocation, on every connection.
    pkv = make_kv(8)
    fp = kv_fingerprint(pkv)
    with KVTransferServer(pkv, fp, TransferConfig(**FAST), SyntheticBackend(pkv)) as server:
        socks = [socket.create_connection(server.address) for _ in range(40)]
        try:
            for s in socks:
                s.sendall(proto.PREFIX.pack(proto.MAGIC, proto.VERSION, 0, 16 << 20, 0))
            for s in socks:
                s.settimeout(5)
                assert s.recv(1) == b""          # closed by P, not held open
        finally:
            for s in socks:
                s.close()
        assert server.jobs() == []


def test_silent_connections_cannot_exhaust_the_kv_port():
    # Connections that never finish the handshake are bounded in number and in time; an
    # honest decode worker still gets through once they are gone.
    pkv, dkv = make_kv(8), make_kv(8)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport="tcp", max_pending_handshakes=4, handshake_timeout=4.0,
                         **FAST)
    with KVTransferServer(pkv, fp, cfg, SyntheticBackend(pkv)) as server:
        idle = [socket.create_connection(server.address) for _ in range(4)]
        try:
            deadline = time.monotonic() + 10
            while server.handshakes_in_progress() < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            extra = socket.create_connection(server.address)
            extra.settimeout(2.0)                # well before the handshake timeout
            assert extra.recv(1) == b""          # over the bound: closed unread
            extra.close()
            for s in idle:
                s.settimeout(15)
                assert s.recv(1) == b""          # dropped after the handshake timeout
        finally:
            for s in idle:
                s.close()
        while server.handshakes_in_progress():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = fetch_kv(server.address, request("honest", 1), [2], dkv,
                     TransferConfig(transport="tcp", **FAST), fp)
        assert r.ok, r.reason
