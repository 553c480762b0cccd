"""P side: the KV port. Accepts D's sessions, runs prefills, enforces leases.

    server = KVTransferServer(kv, fingerprint, config, backend, host, port)
    server.start()            # -> (host, port) actually bound
    ...
    server.close()            # releases every pinned request

Threads: one acceptor, one lease reaper, per connection one sender + one reader, per
request one prefill thread (Job). Blocking sockets in threads: the payload path is one
sendmsg from KV memory (recv_into on D), both GIL-free syscalls, so an event loop would
add only scheduling overhead; tcp reaches ~0.9x a plain socket blast this way (an asyncio
variant was not built for comparison).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time

import torch

from splitserve.transfer import protocol as proto
from splitserve.transfer.backend import PrefillBackend, PrefillRequest
from splitserve.transfer.config import TransferConfig, TransferStats
from splitserve.transfer.connection import Connection
from splitserve.transfer.handshake import host_id, proof, proof_ok, tune_socket
from splitserve.transfer.job import Job
from splitserve.transfer.kvmem import KVBlocks, as_blocks, describe_mismatch
from splitserve.transfer.shm import ShmSender
from splitserve.transfer.shmfile import RingPool, shared_kv_file
from splitserve.transfer.tcp import TcpTransport

log = logging.getLogger(__name__)


class _Refused(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class KVTransferServer:
    def __init__(self, kv: torch.Tensor | KVBlocks, fingerprint: dict[str, str],
                 config: TransferConfig,
                 backend: PrefillBackend, host: str = "127.0.0.1", port: int = 0,
                 stats: TransferStats | None = None, partial_start: bool = False):
        self.blocks = as_blocks(kv)
        self.fingerprint = dict(fingerprint)
        self.config = config
        self.backend = backend
        self.stats = stats or TransferStats()
        # A new request may start past block 0 (D holds a prefix already). Off for our
        # engine, where a PREFILL resuming an unknown request means P lost it (restart,
        # lease) and D should hear so at once; the vLLM connector's backend itself refuses
        # transfers it does not know.
        self.partial_start = partial_start
        self.blocks_per_frame = max(1, min(config.frame_bytes // self.blocks.block_nbytes,
                                           self.blocks.max_blocks_per_frame()))
        self._host_id = host_id()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lsock = socket.create_server((host, port), backlog=128)
        self.address: tuple[str, int] = self._lsock.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._handshaking = 0           # connections not yet past the handshake; under _lock
        # D can copy straight out of our KV when it is the engine's shared pool; foreign
        # memory (vLLM's) goes through a ring.
        self._shared_kv = shared_kv_file(self.blocks.kv) if self.blocks.kv is not None else None
        self._rings = RingPool(self.blocks_per_frame * self.blocks.block_nbytes,
                               config.shm_ring_bytes)
        # Half a ring: P can always fill one half while D empties the other, so batching
        # ACKs never starves the shm sender of slots.
        self.ack_every = max(1, self._rings.size // self._rings.slot_bytes // 2)

    def start(self) -> tuple[str, int]:
        for target, name in ((self._accept_loop, "kv-accept"), (self._reap_loop, "kv-lease")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("KV transfer server listening on %s:%d", *self.address)
        return self.address

    def __enter__(self) -> "KVTransferServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        for job in list(self._jobs.values()):
            self.release(job, "server shutting down", expired=False)
        for t in self._threads:
            t.join(timeout=5)
        self._rings.close()

    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def drop(self, request_id: str, why: str) -> None:
        """Stop serving a request now, from the caller's thread: its blocks are about to
        be reused. Shutting the session's socket down means no frame can start or finish
        after this returns, so D never verifies bytes read after the reuse; a D that
        reconnects hears why from the backend."""
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            self.release(job, why, expired=False)

    def handshakes_in_progress(self) -> int:
        with self._lock:
            return self._handshaking

    def _end_handshake(self) -> None:
        with self._lock:
            self._handshaking -= 1

    def queue_status(self, job: Job) -> tuple[int, int]:
        """(requests, prompt tokens) this worker computes before `job` starts, in arrival
        order; (0, 0) once it has started. Reads other jobs' counters without their locks:
        each is one int, and a stale value only makes one PROGRESS frame slightly old."""
        if job.progress_seq > 0:
            return 0, 0
        with self._lock:
            jobs = list(self._jobs.values())
        if job not in jobs:
            return 0, 0
        ahead = [j for j in jobs[:jobs.index(job)] if j.first_token is None and j.error is None]
        return len(ahead), sum(max(0, j.tokens_total - j.tokens_done) for j in ahead)

    # -- lifecycle of a request ------------------------------------------------------

    def release(self, job: Job, why: str, expired: bool, cancelled: bool = False) -> None:
        """Unpin a request exactly once; the only path to backend.release (which also
        stops its prefill if it is still queued or computing)."""
        with job.cond:
            if job.released:
                return
            job.released = True
            conn, job.conn = job.conn, None
            pinned, sent, acked = len(job.ids), job.bytes_sent, job.verified_upto
            done, total, computed = job.tokens_done, job.tokens_total, job.first_token is not None
            idle = time.monotonic() - (job.deadline - job.lease)
            job.cond.notify_all()
        with self._lock:
            self._jobs.pop(job.rid, None)
        self.backend.release(job.rid)
        self.stats.add("blocks_pinned", -pinned)
        if cancelled:
            self.stats.add("prefills_cancelled")
            state = ("computed already" if computed else
                     "still queued, not started" if job.progress_seq == 0 else
                     f"stopped after {done}/{total} tokens")
            log.warning("request %s: decode gave up (%s); prefill dropped, %s; %d bytes "
                        "sent", job.rid, why, state, sent)
        elif expired:
            self.stats.add("lease_expired")
            self.stats.incident("lease_expired", job.rid, why,
                                f"no ACK/HEARTBEAT for {idle:.1f}s (lease {job.lease:.1f}s); "
                                f"decode verified {acked}/{job.request.num_blocks} blocks")
            log.warning("request %s: releasing %d pinned KV blocks: lease expired (%s, no "
                        "ACK/HEARTBEAT for %.1fs, lease %.1fs); %d bytes sent, decode "
                        "verified %d/%d blocks", job.rid, pinned, why, idle, job.lease, sent,
                        acked, job.request.num_blocks)
        else:
            log.info("request %s: released %d KV blocks (%s); %d bytes sent in %.2fs",
                     job.rid, pinned, why, sent, time.monotonic() - job.started)
        if conn is not None:
            conn.abort()

    def _reap_loop(self) -> None:
        tick = min(0.5, self.config.lease / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                jobs = list(self._jobs.values())
            for job in jobs:
                with job.cond:
                    expired = now > job.deadline and not job.released
                    why = "decode connected but silent" if job.conn else "decode disconnected"
                if expired:
                    self.release(job, why, expired=True)

    # -- connections -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True,
                             name=f"kv-conn-{peer[0]}:{peer[1]}").start()

    def _serve(self, sock: socket.socket, peer) -> None:
        transport = None
        with self._lock:
            admitted = self._handshaking < self.config.max_pending_handshakes
            self._handshaking += admitted
        if not admitted:
            # Unauthenticated peers cannot pile up threads and buffers: past the bound a
            # new connection is closed before a byte of it is read.
            log.warning("refusing KV connection from %s:%d: %d handshakes already in "
                        "progress", *peer[:2], self.config.max_pending_handshakes)
            sock.close()
            return
        in_handshake = True
        try:
            tune_socket(sock, self.config)
            sock.settimeout(self.config.handshake_timeout)   # a silent connector is dropped
            ch = proto.Channel(sock, proto.HANDSHAKE_MAX_HEADER)
            try:
                transport, job, resume = self._handshake(ch)
            except _Refused as r:
                log.warning("refusing KV session from %s:%d (%s): %s", *peer[:2], r.code, r.reason)
                ch.send(proto.Refuse(r.code, r.reason))
                return
            self._end_handshake()
            in_handshake = False
            sock.settimeout(None)   # from here liveness is the lease, not a socket timeout
            conn = Connection(ch, transport, job, self.blocks_per_frame, resume, self,
                              self.config.heartbeat_interval)
            with job.cond:
                old, job.conn = job.conn, conn
                if job.released:
                    conn.closed = True
            if old is not None:
                log.info("request %s: decode reconnected, dropping the previous session", job.rid)
                old.abort()
            job.renew()
            conn.run()
            with job.cond:
                if job.conn is conn:
                    job.conn = None
        except proto.ProtocolError as e:
            log.warning("closing KV session from %s:%d: %s", *peer[:2], e)
        except (OSError, ConnectionError) as e:
            log.info("KV session from %s:%d ended: %s", *peer[:2], e)
        finally:
            if in_handshake:
                self._end_handshake()
            if transport is not None:
                transport.close()
            sock.close()

    def _handshake(self, ch: proto.Channel):
        """HELLO -> CHALLENGE -> SESSION (authenticated, then fingerprint) -> HELLO_OK ->
        PREFILL. Until D's proof checked out every frame is small (HANDSHAKE_MAX_HEADER)
        and a refusal says nothing about this worker."""
        cfg = self.config
        try:
            hello, _ = ch.recv()
        except proto.VersionMismatch as e:
            raise _Refused("version", str(e)) from None
        if not isinstance(hello, proto.Hello):
            raise proto.ProtocolError(f"expected HELLO, got {type(hello).__name__}")
        nonce = os.urandom(16)
        ch.send(proto.Challenge(nonce, proof(cfg.secret, b"P", hello.nonce, nonce),
                                cfg.secret is not None))
        session, _ = ch.recv()
        if not isinstance(session, proto.Session):
            raise proto.ProtocolError(f"expected SESSION, got {type(session).__name__}")
        if cfg.secret is not None and not (
                session.proof and proof_ok(cfg.secret, session.proof, b"D", nonce, hello.nonce)):
            self.stats.add("auth_failures")
            raise _Refused("auth", "authentication failed")
        if session.fingerprint != self.fingerprint:
            raise _Refused("fingerprint", f"KV fingerprint mismatch: prefill has "
                           f"{self.fingerprint}, decode has {session.fingerprint} "
                           f"({describe_mismatch(self.fingerprint, session.fingerprint)})")
        transport = self._choose_transport(session)
        try:
            ch.send(proto.HelloOk(proto.VERSION, self.fingerprint, transport.name,
                                  self.ack_every, getattr(transport, "path", ""),
                                  getattr(transport, "size", 0)))
            ch.max_header = cfg.max_header_bytes   # authenticated: token ids may follow
            msg, _ = ch.recv()
            if not isinstance(msg, proto.Prefill):
                raise proto.ProtocolError(f"expected PREFILL, got {type(msg).__name__}")
            job = self._attach(msg)
        except BaseException:
            transport.close()
            raise
        return transport, job, msg.resume_from_block

    def _choose_transport(self, session: proto.Session):
        cfg = self.config
        same_host = session.host_id == self._host_id
        if "shm" in session.transports and same_host and cfg.transport in ("auto", "shm"):
            return ShmSender(self.blocks, cfg.chunk_bytes, self._shared_kv, self._rings)
        if "tcp" in session.transports and cfg.transport in ("auto", "tcp"):
            return TcpTransport(self.blocks, cfg.chunk_bytes)
        raise _Refused("transport", f"no common transport: decode offers {session.transports} "
                       f"(same host: {same_host}), prefill allows {cfg.transport}")

    def _attach(self, p: proto.Prefill) -> Job:
        """Find the Job this PREFILL resumes, or start a new one."""
        want = math.ceil(len(p.token_ids) / self.blocks.block_size)
        if not p.token_ids or p.num_blocks != want:
            raise _Refused("bad_request", f"request {p.request_id}: {len(p.token_ids)} tokens "
                           f"need {want} blocks of {self.blocks.block_size}, decode reserved "
                           f"{p.num_blocks}")
        if not 0 <= p.resume_from_block <= p.num_blocks:
            raise _Refused("bad_request", f"request {p.request_id}: resume_from_block "
                           f"{p.resume_from_block} outside 0..{p.num_blocks}")
        with self._lock:
            job = self._jobs.get(p.request_id)
            if job is None:
                if p.resume_from_block > 0 and not self.partial_start:
                    raise _Refused("unknown_request", f"request {p.request_id}: nothing to "
                                   "resume (lease expired or prefill worker restarted)")
                req = PrefillRequest(p.request_id, p.token_ids, p.sampling, p.num_blocks)
                job = Job(req, self.backend, self.config.lease, self.blocks.num_blocks,
                          lambda n: self.stats.add("blocks_pinned", n))
                self._jobs[p.request_id] = job
                job.start()
                log.info("request %s: prefill of %d tokens started for decode", p.request_id,
                         len(p.token_ids))
                return job
        if job.request.token_ids != p.token_ids:
            raise _Refused("bad_request", f"request {p.request_id}: already running with "
                           "different tokens")
        log.info("request %s: decode resumes from block %d", p.request_id, p.resume_from_block)
        return job
