"""Receives the KV cache events of an in-process vLLM engine (its ZMQ publisher).

vLLM's scheduler runs in its own process (EngineCore) and publishes each step's KV cache
events as numbered batches on a ZMQ PUB socket; with a replay endpoint it also keeps the
last batches for a subscriber that missed some. Both endpoints are IPC sockets in a
private temporary directory: local to this host and this worker, no port to pick.
(vLLM binds its PUB socket only for wildcard or IPC endpoints: a loopback TCP endpoint
would make it connect instead.)

NOTE: ZMQ PUB/SUB drops what is published before a subscription reaches the publisher,
and under a full queue. vLLM numbers batches from 0, so a batch whose seq is ahead of the
next one expected means some were missed: they are fetched from the replay endpoint,
in order, before this one. Batches the replay no longer holds are lost for good: the
listener then reports `lost` (the mirror must start again from nothing).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

logger = logging.getLogger(__name__)

_END_SEQ = -1           # vLLM's replay end marker
_POLL_MS = 100          # how often the thread looks at its stop flag
_REPLAY_TIMEOUT_MS = 5000


class VllmKVEventListener:
    """on_batch(events) gets each batch's vLLM events in order, on the listener thread;
    on_lost() when batches were missed beyond the replay buffer."""

    def __init__(self, on_batch: Callable[[list[Any]], None], on_lost: Callable[[], None]):
        self._on_batch = on_batch
        self._on_lost = on_lost
        self._dir = Path(tempfile.mkdtemp(prefix="splitserve-vllm-events-"))
        self.endpoint = f"ipc://{self._dir / 'pub'}"
        self.replay_endpoint = f"ipc://{self._dir / 'replay'}"
        self._ctx = zmq.Context()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_seq = 0
        self._decoder = None

    def start(self) -> None:
        """Once vLLM has bound its sockets (the engine is built)."""
        # Imported here: vLLM is loaded by then, and only in vLLM workers.
        from vllm.distributed.kv_events import KVEventBatch
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)
        self._thread = threading.Thread(target=self._run, args=(sub,), name="vllm-kv-events",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2 * _POLL_MS / 1000 + _REPLAY_TIMEOUT_MS / 1000)
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _run(self, sub: zmq.Socket) -> None:
        try:
            while not self._stopping.is_set():
                if not sub.poll(_POLL_MS):
                    continue
                _topic, seq_bytes, payload = sub.recv_multipart()
                self._receive(int.from_bytes(seq_bytes, "big", signed=True), payload)
        except Exception:  # noqa: BLE001 - the router's view degrades; serving goes on
            if not self._stopping.is_set():
                logger.exception("the vLLM KV event listener failed; the kv router no longer "
                                 "learns this worker's cached blocks")
        finally:
            sub.close(linger=0)

    def _receive(self, seq: int, payload: bytes) -> None:
        if seq < self._next_seq:
            return                          # already had it (from a replay)
        if seq > self._next_seq:
            logger.info("KV events %d..%d from vLLM were missed; replaying them",
                        self._next_seq, seq - 1)
            for replayed_seq, replayed in self._replay(self._next_seq):
                if replayed_seq == self._next_seq:
                    self._deliver(replayed_seq, replayed)
            if seq > self._next_seq:
                logger.warning("KV events %d..%d from vLLM are lost (no longer replayable); "
                               "this worker's cached blocks are announced afresh from now on",
                               self._next_seq, seq - 1)
                self._on_lost()
        self._deliver(seq, payload)

    def _deliver(self, seq: int, payload: bytes) -> None:
        self._next_seq = seq + 1
        self._on_batch(self._decoder.decode(payload).events)

    def _replay(self, start: int) -> list[tuple[int, bytes]]:
        dealer = self._ctx.socket(zmq.DEALER)
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            batches = []
            while dealer.poll(_REPLAY_TIMEOUT_MS):
                _empty, _topic, seq_bytes, payload = dealer.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq == _END_SEQ:
                    return batches
                batches.append((seq, payload))
            logger.warning("vLLM's KV event replay did not answer within %d ms",
                           _REPLAY_TIMEOUT_MS)
            return batches
        finally:
            dealer.close(linger=0)
