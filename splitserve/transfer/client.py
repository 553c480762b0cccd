"""D side: fetch one request's KV from P into reserved blocks, surviving what can be survived.

    result = fetch_kv((host, port), request, dest_blocks, kv, config, fingerprint,
                      cancel=FetchCancel())

Blocking; the engine runs it on a thread. Never raises for transfer failures: the outcome
says what happened, and `blocks_verified` says which prefix the engine can reuse for a
local fallback. Two clocks decide when to give up on P: its silence (no frame at all for
`stall_timeout`: dead) and the request's standstill (P keeps sending PROGRESS but the
request has not advanced for `busy_timeout`: busy). Giving up on a live P sends CANCEL,
so P never computes a prompt that D computes itself. Invariant: a logical block is marked verified only after its bytes landed
in `kv[dest_blocks[i]]` and their xxh3 matched; it is unmarked before anything is written
into it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Sequence

import torch

from splitserve.transfer import protocol as proto
from splitserve.transfer.backend import PrefillRequest
from splitserve.transfer.config import FetchResult, Outcome, TransferConfig, TransferStats
from splitserve.transfer.handshake import host_id, proof, proof_ok, tune_socket
from splitserve.transfer.kvmem import KVBlocks, as_blocks, describe_mismatch
from splitserve.transfer.shm import ShmReceiver
from splitserve.transfer.tcp import TcpTransport

log = logging.getLogger(__name__)

_REFUSE_OUTCOME = {"version": Outcome.MISMATCH, "fingerprint": Outcome.MISMATCH,
                   "auth": Outcome.AUTH_FAILED, "unknown_request": Outcome.PEER_DEAD}


class _Fatal(Exception):
    """The transfer cannot succeed by reconnecting."""

    def __init__(self, outcome: Outcome, reason: str):
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


def _refused(msg: proto.Refuse) -> _Fatal:
    return _Fatal(_REFUSE_OUTCOME.get(msg.code, Outcome.REFUSED),
                  f"prefill refused ({msg.code}): {msg.reason}")


class FetchCancel:
    """Lets another thread end a fetch early (client gone, request aborted). cancel()
    wakes the fetch thread at once by shutting down the read side of its socket; the
    thread then tells P (CANCEL) and returns with outcome CANCELLED."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._event = threading.Event()
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            sock = self._sock
        self._event.set()
        if sock is not None:
            with contextlib.suppress(OSError):   # the session may have closed meanwhile
                sock.shutdown(socket.SHUT_RD)

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early (True) when cancelled."""
        return self._event.wait(seconds)

    def _attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            cancelled = self.reason is not None
        if cancelled and sock is not None:
            sock.shutdown(socket.SHUT_RD)


class _Fetch:
    def __init__(self, addr, request: PrefillRequest, dest_blocks: Sequence[int],
                 kv: torch.Tensor | KVBlocks, config: TransferConfig, fingerprint: dict[str, str],
                 cancel: FetchCancel, have_blocks: int = 0):
        self.addr, self.req, self.cfg, self.fp = addr, request, config, dict(fingerprint)
        self.cancel = cancel
        self.rid = request.request_id
        self.blocks = as_blocks(kv)
        self.dest = list(dest_blocks)
        self.n = len(self.dest)
        if not 0 <= have_blocks <= self.n:
            raise ValueError(f"request {self.rid}: have_blocks {have_blocks} outside 0..{self.n}")
        # Logical blocks < have_blocks are already in D's KV (a local prefix hit): never
        # requested, never written (P resumes past them, and BLOCKS below are refused).
        self.have = have_blocks
        self.verified = bytearray(b"\x01" * have_blocks + bytes(self.n - have_blocks))
        self.upto = have_blocks           # verified prefix length
        self.first_token: int | None = None
        self.first_logprobs: proto.FirstTokenLogprobs | None = None
        self.bytes = self.resumes = self.checksum_failures = self.sessions = 0
        self.connected = False            # did the latest attempt reach P at all?
        self.heard = False                # did P say it is alive (PROGRESS) in the latest session?
        self.transport_name = ""
        self.ack_every = 1
        self.unacked = 0                  # frames verified but not yet answered
        self.tokens_done = 0              # P's latest word on how far the prompt is computed
        self.queue_position = self.tokens_ahead = 0
        self.last_advance = time.monotonic()   # when the request last moved (busy clock)

    def _advance(self) -> None:
        while self.upto < self.n and self.verified[self.upto]:
            self.upto += 1

    def session(self) -> None:
        """One connection: handshake, PREFILL (resuming at the verified prefix), receive
        until every block is verified and DONE arrived. Returns normally only on success.
        Giving up for a reason P should know (busy, cancelled, stalled, corrupt data) sends
        CANCEL on the way out, so P drops the request instead of computing it anyway."""
        cfg = self.cfg
        self.connected = self.heard = False
        sock = socket.create_connection(self.addr, timeout=cfg.connect_timeout)
        self.connected = True
        self.cancel._attach(sock)
        transport = None
        prefill_sent = False
        try:
            tune_socket(sock, cfg)
            # Wake often enough to heartbeat and to notice a stall on time.
            sock.settimeout(min(cfg.heartbeat_interval, cfg.stall_timeout) / 2)
            ch = proto.Channel(sock, cfg.max_header_bytes)
            ch.on_idle = lambda: self._idle(ch, heartbeat=False)
            transport = self._handshake(ch)
            prefill_sent = True
            ch.on_idle = lambda: self._idle(ch, heartbeat=True)
            log.info("request %s: KV session with %s:%d over %s, resuming at block %d/%d",
                     self.rid, *self.addr, transport.name, self.upto, self.n)
            try:
                self._receive(ch, transport)
            except proto.PeerClosed:
                if self.cancel.cancelled:   # our own SHUT_RD woke the receive
                    raise _Fatal(Outcome.CANCELLED, self.cancel.reason) from None
                raise
            try:
                ch.send(proto.Release(self.rid))
            except OSError as e:   # we have everything; P's lease will clean up
                log.info("request %s: could not send RELEASE: %s", self.rid, e)
        except (_Fatal, proto.ProtocolError) as e:
            if prefill_sent:
                self._send_cancel(sock, str(e))
            raise
        finally:
            self.cancel._attach(None)
            if transport is not None:
                transport.close()
            sock.close()

    def _send_cancel(self, sock: socket.socket, reason: str) -> None:
        """Best effort, never blocking long: a stopped P reads it when it wakes up."""
        try:
            sock.settimeout(1.0)
            sock.sendall(proto.encode_head(proto.Cancel(self.rid, reason[:1000])))
        except OSError as e:
            log.info("request %s: could not send CANCEL to prefill: %s", self.rid, e)

    def _idle(self, ch: proto.Channel, heartbeat: bool) -> None:
        now = time.monotonic()
        if self.cancel.cancelled:
            raise _Fatal(Outcome.CANCELLED, self.cancel.reason)
        if now - ch.last_rx > self.cfg.stall_timeout:
            raise _Fatal(Outcome.STALLED, f"prefill worker silent for {now - ch.last_rx:.1f}s: "
                         f"no frame, not even a PROGRESS heartbeat (kv_stall_timeout "
                         f"{self.cfg.stall_timeout}s)")
        self._check_busy(now)
        if heartbeat:
            self._keep_lease(ch, now)

    def _keep_lease(self, ch: proto.Channel, now: float) -> None:
        """P's lease on this request's blocks runs out unless D speaks every
        heartbeat_interval. Called when a receive waits and after every frame: a P whose
        PROGRESS frames come faster than the receive timeout never leaves D idle, and a
        long chunk (or blocks D already holds) sends no BLOCKS to ACK for a while."""
        if now - ch.last_tx >= self.cfg.heartbeat_interval:
            if self.unacked:
                self._ack(ch)     # a pause is a good time to report progress
            else:
                ch.send(proto.Heartbeat(self.rid))

    def _check_busy(self, now: float) -> None:
        if now - self.last_advance > self.cfg.busy_timeout:
            where = (f"queued at position {self.queue_position} with {self.tokens_ahead} "
                     f"prompt tokens ahead" if self.queue_position else
                     f"at {self.tokens_done}/{len(self.req.token_ids)} prompt tokens")
            raise _Fatal(Outcome.BUSY, f"prefill worker alive but this request made no "
                         f"progress for {now - self.last_advance:.1f}s ({where}; "
                         f"kv_busy_timeout {self.cfg.busy_timeout}s)")

    def _ack(self, ch: proto.Channel) -> None:
        ch.send(proto.Ack(self.rid, self.upto, self.unacked))
        self.unacked = 0

    def hello(self, ch: proto.Channel) -> tuple[proto.HelloOk, list[str]]:
        """HELLO .. HELLO_OK: both sides authenticated, fingerprints equal. Raises _Fatal
        (AUTH_FAILED, MISMATCH, or P's refusal). Also the whole of doctor's session probe
        (splitserve/transfer/probe.py), which stops here."""
        cfg = self.cfg
        nonce = os.urandom(16)
        offers = {"auto": ["shm", "tcp"], "tcp": ["tcp"], "shm": ["shm"]}[cfg.transport]
        ch.send(proto.Hello(proto.VERSION, nonce))
        challenge = self._expect(ch, proto.Challenge)
        # Never trust that P checked: P must prove the secret before D says anything more.
        if cfg.secret is not None and not (
                challenge.proof and proof_ok(cfg.secret, challenge.proof, b"P", nonce,
                                             challenge.nonce)):
            raise _Fatal(Outcome.AUTH_FAILED, "prefill failed authentication: its proof does "
                         "not match this worker's KV secret")
        if challenge.auth_required and cfg.secret is None:
            raise _Fatal(Outcome.AUTH_FAILED, "prefill requires a KV secret and this worker "
                         "has none (set --kv-secret or $SPLITSERVE_KV_SECRET)")
        ch.send(proto.Session(self.fp, offers, host_id(),
                              proof(cfg.secret, b"D", challenge.nonce, nonce)))
        msg = self._expect(ch, proto.HelloOk)
        if msg.fingerprint != self.fp:
            raise _Fatal(Outcome.MISMATCH, f"KV fingerprint mismatch: decode has {self.fp}, "
                         f"prefill has {msg.fingerprint} "
                         f"({describe_mismatch(self.fp, msg.fingerprint)})")
        return msg, offers

    def _handshake(self, ch: proto.Channel):
        cfg = self.cfg
        msg, offers = self.hello(ch)
        if msg.transport == "shm" and "shm" in offers:
            transport = ShmReceiver(self.blocks, cfg.chunk_bytes, msg.shm_path, msg.shm_bytes)
        elif msg.transport == "tcp" and "tcp" in offers:
            transport = TcpTransport(self.blocks, cfg.chunk_bytes)
        else:
            raise proto.ProtocolError(f"prefill chose transport {msg.transport!r}, not offered")
        self.transport_name = transport.name
        self.ack_every, self.unacked = max(1, msg.ack_every), 0
        try:
            ch.send(proto.Prefill(self.rid, list(self.req.token_ids), self.req.sampling,
                                  self.n, self.upto))
        except BaseException:
            transport.close()
            raise
        self.resumes += self.sessions > 0
        self.sessions += 1
        return transport

    def _expect(self, ch: proto.Channel, kind: type):
        try:
            msg, _ = ch.recv()
        except proto.VersionMismatch as e:
            raise _Fatal(Outcome.MISMATCH, str(e)) from None
        if isinstance(msg, proto.Refuse):
            raise _refused(msg)
        if not isinstance(msg, kind):
            raise proto.ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
        return msg

    def _receive(self, ch: proto.Channel, transport) -> None:
        bn = self.blocks.block_nbytes
        done = False
        while not (done and self.upto == self.n):
            msg, plen = ch.recv()
            if getattr(msg, "request_id", self.rid) != self.rid:
                raise proto.ProtocolError(f"frame for unknown request {msg.request_id!r}")
            if isinstance(msg, proto.Blocks):
                f, k = msg.first_block, msg.num_blocks
                # Bounds before any byte is written: the range must lie inside this
                # request's reservation and the size must be exactly k blocks.
                if not (self.have <= f and 0 < k and f + k <= self.n and msg.nbytes == k * bn):
                    raise proto.ProtocolError(
                        f"BLOCKS {f}+{k} ({msg.nbytes} bytes) outside reservation of "
                        f"{self.n} blocks of {bn} bytes")
                self.verified[f:f + k] = bytes(k)
                self.upto = min(self.upto, f)
                got = transport.recv_blocks(ch, msg, plen, self.dest[f:f + k])
                self.bytes += msg.nbytes
                if got == msg.checksum:
                    self.verified[f:f + k] = b"\x01" * k
                    self._advance()
                    self.last_advance = time.monotonic()
                    self.unacked += 1
                    if self.unacked >= self.ack_every:
                        self._ack(ch)
                else:
                    self.checksum_failures += 1
                    log.warning("request %s: checksum mismatch on blocks %d..%d, asking again",
                                self.rid, f, f + k - 1)
                    if self.checksum_failures > self.cfg.max_checksum_failures:
                        raise _Fatal(Outcome.CORRUPT, f"{self.checksum_failures} checksum "
                                     "failures; prefill's data keeps arriving corrupt")
                    if self.unacked:
                        self._ack(ch)     # answers stay in frame order
                    ch.send(proto.Nack(self.rid, f, k))
            elif isinstance(msg, proto.Progress):
                self._on_progress(msg)
            elif isinstance(msg, proto.Done):
                if msg.num_blocks != self.n:
                    raise proto.ProtocolError(f"DONE for {msg.num_blocks} blocks, expected {self.n}")
                self.first_token, self.first_logprobs, done = msg.first_token, msg.first_logprobs, True
            elif isinstance(msg, proto.Refuse):   # P checks PREFILL after HELLO_OK
                raise _refused(msg)
            elif isinstance(msg, proto.Error):
                raise _Fatal(Outcome.PEER_ERROR, f"prefill reported: {msg.reason}")
            else:
                raise proto.ProtocolError(f"unexpected {type(msg).__name__} from prefill")
            self._keep_lease(ch, time.monotonic())


    def _on_progress(self, msg: proto.Progress) -> None:
        self.heard = True
        if msg.tokens_done > self.tokens_done:
            self.tokens_done = msg.tokens_done
            self.last_advance = time.monotonic()
        log.debug("request %s: prefill progress %d/%d tokens (queue position %d, %d tokens "
                  "ahead)", self.rid, msg.tokens_done, msg.tokens_total, msg.queue_position,
                  msg.tokens_ahead)
        self.queue_position, self.tokens_ahead = msg.queue_position, msg.tokens_ahead
        self._check_busy(time.monotonic())


def fetch_kv(addr: tuple[str, int], request: PrefillRequest, dest_blocks: Sequence[int],
             kv: torch.Tensor | KVBlocks, config: TransferConfig, fingerprint: dict[str, str],
             stats: TransferStats | None = None,
             cancel: FetchCancel | None = None, have_blocks: int = 0) -> FetchResult:
    """Receive `request`'s KV from the P at `addr`; logical block i lands in kv[dest_blocks[i]].

    `dest_blocks` is the reservation: nothing outside those blocks is ever written. Its
    length is the block count sent in PREFILL; P refuses unless it equals
    ceil(len(token_ids) / block_size). With `have_blocks` > 0 the first logical blocks are
    already in D's KV and are not fetched (P must allow it: `KVTransferServer(...,
    partial_start=True)`).
    """
    t0 = time.monotonic()
    f = _Fetch(addr, request, dest_blocks, kv, config, fingerprint, cancel or FetchCancel(),
               have_blocks)
    if f.n == 0:
        raise ValueError(f"request {f.rid}: empty reservation")
    f.blocks.check_ids(f.dest, f"request {f.rid} dest_blocks")
    failures = 0
    outcome, reason = Outcome.OK, ""
    while True:
        before = (f.upto, f.tokens_done)
        if f.cancel.cancelled:
            outcome, reason = Outcome.CANCELLED, f.cancel.reason
            break
        try:
            f._check_busy(time.monotonic())
            f.session()
            break
        except _Fatal as e:
            outcome, reason = e.outcome, e.reason
            break
        except proto.ProtocolError as e:
            outcome, reason = Outcome.PROTOCOL_ERROR, f"prefill broke the protocol: {e}"
            break
        except (OSError, ConnectionError) as e:
            # Only consecutive failures without a sign of life count against the budget (a
            # newly verified block, more of the prompt computed, or a PROGRESS at all): a
            # long transfer over a flaky link keeps going while P is alive, for at most
            # the busy timeout without the request advancing.
            advanced = f.upto > before[0] or f.tokens_done > before[1] or f.heard
            failures = 0 if advanced else failures + 1
            if f.cancel.cancelled:
                outcome, reason = Outcome.CANCELLED, f.cancel.reason
                break
            if failures > config.reconnect_attempts:
                outcome = Outcome.RETRIES_EXHAUSTED if f.connected else Outcome.PEER_DEAD
                reason = (f"{failures} consecutive connection failures without progress, "
                          f"last: {e!r}")
                break
            pause = min(2.0, config.reconnect_backoff * 2 ** max(0, failures - 1))
            log.warning("request %s: KV connection to %s:%d failed (%r) at block %d/%d; "
                        "reconnecting in %.2fs", f.rid, *addr, e, f.upto, f.n, pause)
            f.cancel.wait(pause)
    result = FetchResult(outcome, reason, f.upto, f.first_token if outcome is Outcome.OK else None,
                         f.bytes, f.resumes, f.checksum_failures, time.monotonic() - t0,
                         f.transport_name,
                         f.first_logprobs if outcome is Outcome.OK else None)
    if result.ok:
        log.info("request %s: KV transfer ok: %d blocks, %d bytes in %.3fs (%d resumes, %d "
                 "checksum failures)", f.rid, f.n, f.bytes, result.seconds, f.resumes,
                 f.checksum_failures)
    else:
        log.log(logging.INFO if outcome is Outcome.CANCELLED else logging.WARNING,
                "request %s: KV transfer failed (%s): %s; %d/%d blocks verified",
                f.rid, outcome.value, reason, f.upto, f.n)
    if stats is not None:
        stats.record_fetch(result)
    return result
