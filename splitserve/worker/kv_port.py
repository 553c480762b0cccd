"""A prefill worker's KV port: the transfer server over this worker's engine.

It can only start once the model has loaded (it serves the engine's KV memory and
fingerprint, WorkerEngine.kv_memory()), so it comes up behind the HTTP server; until it
listens, /health says so.
"""

from __future__ import annotations

import asyncio
import logging

from splitserve.transfer.config import TransferStats
from splitserve.transfer.server import KVTransferServer
from splitserve.transfer.shmfile import free_shared_kv
from splitserve.worker.engine_api import EngineState, WorkerEngine
from splitserve.worker.config import WorkerConfig
from splitserve.worker.prefill_backend import EnginePrefillBackend

logger = logging.getLogger(__name__)


class KVPort:
    def __init__(self, engine: WorkerEngine, config: WorkerConfig, stats: TransferStats):
        self.engine = engine
        self.config = config
        self.stats = stats
        self.server: KVTransferServer | None = None
        self.address: tuple[str, int] | None = None   # advertised (host, port) once listening
        self._task: asyncio.Task | None = None
        self._error: str | None = None

    def start_when_ready(self) -> None:
        self._task = asyncio.create_task(self._start(), name="kv-port")

    def status(self) -> str:
        return self._error or "the KV port opens once the model has loaded"

    async def _start(self) -> None:
        while self.engine.state is EngineState.LOADING:
            await asyncio.sleep(0.05)
        if self.engine.state is not EngineState.READY:
            return
        kv = self.engine.kv_memory()
        try:
            self.server = KVTransferServer(
                kv.tensor, kv.fingerprint, self.config.transfer, EnginePrefillBackend(self.engine),
                host=self.config.host, port=self.config.kv_port, stats=self.stats)
            _, port = self.server.start()
        except OSError as e:
            self._error = f"cannot listen on KV port {self.config.host}:{self.config.kv_port}: {e}"
            logger.error(self._error)
            return
        self.address = (self.config.advertised_host(), port)
        logger.info("KV port listening on %s:%d (advertised as %s:%d, transport %s)",
                    self.config.host, port, *self.address, self.config.transfer.transport)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.server is not None:
            self.server.close()
        if (kv := self.engine.kv_memory()) is not None:
            free_shared_kv(kv.tensor)
