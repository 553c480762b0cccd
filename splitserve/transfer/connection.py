"""P side: one accepted connection serving one Job to D after the handshake.

Two threads: the caller's runs `send_loop` (blocks, progress, done; resends first) and a
reader thread handles D's ACK / NACK / HEARTBEAT / RELEASE / CANCEL. Either side ending
calls `abort`, which shuts the socket down so the other wakes up; the Job itself lives on.
NOTE: the sender never stays silent longer than `heartbeat_interval`: while the request
waits in the queue or a long chunk computes, a PROGRESS with its queue place goes out,
so D can tell a busy prefill worker from a dead one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque

from splitserve.transfer import protocol as proto
from splitserve.transfer.job import Job
from splitserve.transfer.transport import BlockSender

log = logging.getLogger(__name__)


class Connection:
    def __init__(self, ch: proto.Channel, transport: BlockSender, job: Job,
                 blocks_per_frame: int, resume_from: int, server, heartbeat_interval: float):
        self.ch = ch
        self.transport = transport
        self.job = job
        self.blocks_per_frame = blocks_per_frame
        self.next_send = resume_from      # first logical block not yet sent on this connection
        self.resends: deque[tuple[int, int]] = deque()
        self.progress_sent = -1
        self.done_sent = False
        self.closed = False
        self.server = server
        self.heartbeat_interval = heartbeat_interval

    def abort(self) -> None:
        """Any thread: end this connection (idempotent)."""
        with self.job.cond:
            if self.closed:
                return
            self.closed = True
            self.job.cond.notify_all()
        self.transport.abort()
        try:
            self.ch.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        reader = threading.Thread(target=self._read_loop, daemon=True,
                                  name=f"kv-reader-{self.job.rid}")
        reader.start()
        try:
            self._send_loop()
        except (OSError, ConnectionError) as e:
            if not self.closed:
                log.info("request %s: connection to decode lost while sending: %s",
                         self.job.rid, e)
        finally:
            self.abort()
            reader.join()

    def _next_action(self):
        """Under job.cond: what to send next, or None to wait. Resends go first."""
        job, n = self.job, self.job.request.num_blocks
        if self.closed or job.released:
            return ("stop",)
        if self.resends:
            first, count = self.resends.popleft()   # _on_nack queued frame-sized pieces
            return ("blocks", first, job.ids[first:first + count])
        if len(job.ids) > self.next_send:
            first = self.next_send
            ids = job.ids[first:first + self.blocks_per_frame]
            self.next_send += len(ids)
            return ("blocks", first, ids)
        if job.error is not None:
            return ("error", job.error)
        # Coalesced: a burst of Progress events becomes one frame with the latest count.
        if job.progress_seq != self.progress_sent and job.first_token is None:
            self.progress_sent = job.progress_seq
            return ("progress", job.tokens_done, job.tokens_total)
        if job.first_token is not None and self.next_send == n and not self.done_sent:
            self.done_sent = True
            return ("done", job.first_token)
        return None

    def _send_loop(self) -> None:
        job = self.job
        while True:
            with job.cond:
                while (action := self._next_action()) is None:
                    quiet_for = time.monotonic() - self.ch.last_tx
                    if quiet_for >= self.heartbeat_interval:
                        action = ("progress", job.tokens_done, job.tokens_total)
                        break
                    job.cond.wait(self.heartbeat_interval - quiet_for)
            kind = action[0]
            if kind == "stop":
                return
            if kind == "blocks":
                _, first, ids = action
                nbytes = self.transport.send_blocks(self.ch, job.rid, first, ids)
                with job.cond:
                    job.bytes_sent += nbytes
                self.server.stats.add("bytes_sent", nbytes)
            elif kind == "progress":
                position, tokens_ahead = self.server.queue_status(job)
                self.ch.send(proto.Progress(job.rid, action[1], action[2], position, tokens_ahead))
            elif kind == "done":
                self.ch.send(proto.Done(job.rid, action[1], job.request.num_blocks, job.first_logprobs))
            elif kind == "error":
                self.ch.send(proto.Error(action[1]))
                self.server.release(job, "prefill failed", expired=False)
                return

    def _read_loop(self) -> None:
        job = self.job
        try:
            while not self.closed:
                msg, _ = self.ch.recv()
                if getattr(msg, "request_id", job.rid) != job.rid:
                    raise proto.ProtocolError(f"frame for request {msg.request_id!r} on the "
                                              f"session of {job.rid!r}")
                if isinstance(msg, proto.Ack):
                    if not (0 <= msg.blocks_verified_upto <= job.request.num_blocks
                            and msg.frames >= 0):
                        raise proto.ProtocolError(f"ACK up to {msg.blocks_verified_upto} "
                                                  f"for {msg.frames} frames")
                    job.renew(msg.blocks_verified_upto)
                    self.transport.frames_answered(msg.frames)
                elif isinstance(msg, proto.Nack):
                    self._on_nack(msg)
                elif isinstance(msg, proto.Heartbeat):
                    job.renew()
                elif isinstance(msg, proto.Release):
                    job.renew()
                    self.server.release(job, "decode confirmed it has every block",
                                        expired=False)
                    return
                elif isinstance(msg, proto.Cancel):
                    self.server.release(job, msg.reason, expired=False, cancelled=True)
                    return
                elif isinstance(msg, proto.Error):
                    log.warning("request %s: decode ended the session: %s", job.rid, msg.reason)
                    return
                else:
                    raise proto.ProtocolError(f"unexpected {type(msg).__name__} from decode")
        except proto.ProtocolError as e:
            log.warning("request %s: closing session, decode broke the protocol: %s",
                        job.rid, e)
        except (OSError, ConnectionError) as e:
            if not self.closed:
                log.info("request %s: connection to decode lost: %s", job.rid, e)
        finally:
            self.abort()

    def _on_nack(self, msg: proto.Nack) -> None:
        job = self.job
        with job.cond:
            if not (0 <= msg.first_block and msg.num_blocks > 0
                    and msg.first_block + msg.num_blocks <= self.next_send):
                raise proto.ProtocolError(f"NACK of blocks {msg.first_block}+{msg.num_blocks} "
                                          f"never sent (sent up to {self.next_send})")
            log.info("request %s: decode reports bad checksum for blocks %d..%d, resending",
                     job.rid, msg.first_block, msg.first_block + msg.num_blocks - 1)
            for f in range(msg.first_block, msg.first_block + msg.num_blocks,
                           self.blocks_per_frame):
                end = min(msg.first_block + msg.num_blocks, f + self.blocks_per_frame)
                self.resends.append((f, end - f))
            job.cond.notify_all()
        job.renew()
        self.transport.frames_answered(1)
