"""Drives the synchronous, single-threaded LLMEngine from asyncio.

The engine lives on one dedicated thread: it is built there (so the HTTP server can
answer /live and /health while the model loads), and every add/abort reaches it through
a command queue, because LLMEngine is not thread-safe. Outputs travel back to the event
loop with call_soon_threadsafe into one asyncio.Queue per request. When there is nothing
to do the thread sleeps on an Event instead of spinning.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from splitserve.engine.llm_engine import RequestError
from splitserve.engine.types import EngineStats, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request on this worker can complete."""


class AsyncEngine:
    def __init__(self, factory: Callable[[], Any], on_fatal: Callable[[str], None]):
        """factory builds the LLMEngine (on the engine thread); on_fatal is called on the
        event loop with a reason when the engine cannot load or crashes."""
        self._factory = factory
        self._on_fatal = on_fatal
        self.state = EngineState.LOADING
        self.failure: str | None = None
        self.engine: Any = None  # set once READY; read-only attributes only from other threads
        self._stats: EngineStats | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._streams: dict[str, asyncio.Queue] = {}  # touched on the event loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- event loop side ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> EngineStats | None:
        """The snapshot taken after the engine's latest step (None while loading)."""
        return self._stats

    async def add(self, request_id: str, prompt_token_ids: list[int],
                  params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Admit a request; raises the engine's RequestError if it is refused. Returns the
        stream of its outputs; leaving that stream before the end aborts the request."""
        if self.state is not EngineState.READY:
            raise EngineDeadError(f"engine is {self.state.value}")
        if request_id in self._streams:
            # Checked here too: the engine's own duplicate check would come after we had
            # already replaced the live request's queue.
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        outputs: asyncio.Queue = asyncio.Queue()
        accepted = self._loop.create_future()
        self._streams[request_id] = outputs
        self._send(("add", request_id, prompt_token_ids, params, accepted))
        try:
            await accepted
        except BaseException:
            # Refused, or our caller was cancelled while waiting: either way nobody will
            # read this stream, and the engine must not keep the request.
            self._streams.pop(request_id, None)
            self.abort(request_id)
            raise
        return self._iterate(request_id, outputs)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def _iterate(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                logger.info("request_id=%s aborted by its caller", request_id)
                self.abort(request_id)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, reason: str) -> None:
        self.state = EngineState.FAILED
        self.failure = reason
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(reason))
        self._on_fatal(reason)

    @staticmethod
    def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
        if fut.done():  # the waiter was cancelled
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    # --- engine thread side ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._factory()
        except Exception as e:
            logger.exception("model load failed")
            self._loop.call_soon_threadsafe(self._fail_all, f"model load failed: {e}")
            return
        self.engine = engine
        self._stats = engine.stats()
        self.state = EngineState.READY
        logger.info("engine ready: model=%s max_model_len=%d", engine.model_name, engine.max_model_len)
        try:
            self._loop_forever(engine)
        except Exception as e:
            logger.exception("engine step failed")
            self._loop.call_soon_threadsafe(self._fail_all, f"engine failed: {e}")

    def _loop_forever(self, engine) -> None:
        while not self._stopping:
            self._apply_commands(engine)
            if engine.has_unfinished_requests():
                outputs = engine.step()
                self._stats = engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
            else:
                # NOTE: clear() after wait() is safe: a command queued before clear() is
                # drained by the _apply_commands at the top of the next iteration.
                self._wakeup.wait()
                self._wakeup.clear()

    def _apply_commands(self, engine) -> None:
        changed = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            changed = True
            if command[0] == "add":
                _, request_id, prompt, params, accepted = command
                try:
                    engine.add_request(request_id, prompt, params)
                    error = None
                except ValueError as e:  # RequestError / SamplingError: the caller's fault
                    error = e
                self._loop.call_soon_threadsafe(self._settle, accepted, error)
            else:
                engine.abort_request(command[1])
        if changed:
            self._stats = engine.stats()
