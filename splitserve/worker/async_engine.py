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
from splitserve.engine.types import EngineStats, FinishReason, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request on this worker can complete."""


class RequestFailed(RuntimeError):
    """The engine failed this one request (e.g. its sampling); the engine and every other
    request go on."""


class AsyncEngine:
    def __init__(self, factory: Callable[[], Any], on_fatal: Callable[[str], None],
                 on_kv_events: Callable[[list], None] | None = None):
        """factory builds the LLMEngine (on the engine thread); on_fatal is called on the
        event loop with a reason when the engine cannot load or crashes. on_kv_events gets
        the engine's KV cache events, on the engine thread, after every step and command
        that produced some (it must not block: it only hands them to the event loop)."""
        self._factory = factory
        self._on_fatal = on_fatal
        self._on_kv_events = on_kv_events
        self.state = EngineState.LOADING
        self.failure: str | None = None
        self.engine: Any = None  # set once READY; read-only attributes only from other threads
        self._stats: EngineStats | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._streams: dict[str, asyncio.Queue] = {}  # touched on the event loop thread only
        self._sinks: dict[str, queue.SimpleQueue] = {}  # held prefills; engine thread only
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
        return await self.open_stream(
            request_id, lambda e: e.add_request(request_id, prompt_token_ids, params))

    async def open_stream(self, request_id: str, start: Callable[[Any], None]) -> AsyncIterator[RequestOutput]:
        """Register the request's output stream, then run start(engine) on the engine
        thread (add_request, or commit_reserved after a KV transfer). Errors from start
        propagate; leaving the returned stream before the end aborts the request."""
        if self.state is not EngineState.READY:
            raise EngineDeadError(f"engine is {self.state.value}")
        if request_id in self._streams:
            # Checked here too: the engine's own duplicate check would come after we had
            # already replaced the live request's queue.
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = outputs
        try:
            await self.call(start)
        except BaseException:
            # Refused, or our caller was cancelled while waiting: either way nobody will
            # read this stream, and the engine must not keep the request.
            self._streams.pop(request_id, None)
            self.abort(request_id)
            raise
        return self._iterate(request_id, outputs)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on the engine thread; its result or exception comes back here.
        ValueError/RuntimeError subclasses (the engine's named errors) are expected; any
        other exception is logged but also only fails this call, never the engine."""
        if self.state is not EngineState.READY:
            raise EngineDeadError(f"engine is {self.state.value}")
        done = self._loop.create_future()
        self._send(("call", fn, done))
        return await done

    def submit_held(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    sink: queue.SimpleQueue) -> None:
        """From any thread: start a prefill whose KV a peer reads. Its outputs (with
        kv_progress) go to `sink` on the engine thread, not to the event loop; a refusal
        arrives there as the exception. Blocks stay pinned until release_held()."""
        self._send(("held", request_id, prompt_token_ids, params, sink))

    def release_held(self, request_id: str) -> None:
        """From any thread: the peer is done with (or gave up on) a held request."""
        self._send(("release", request_id))

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
                if item.error is not None:    # finished: the engine holds nothing of it
                    raise RequestFailed(item.error)
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
        for sink in list(self._sinks.values()):
            sink.put(EngineDeadError(reason))
        self._on_fatal(reason)

    @staticmethod
    def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
        if fut.done():  # the waiter was cancelled
            return
        if error is None:
            fut.set_result(result)
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
                outputs = self._route_held(engine.step())
                self._stats = engine.stats()
                self._drain_kv_events(engine)
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
            else:
                # NOTE: clear() after wait() is safe: a command queued before clear() is
                # drained by the _apply_commands at the top of the next iteration.
                self._wakeup.wait()
                self._wakeup.clear()

    def _route_held(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Hand held prefills' outputs to their sinks; return the rest for the loop."""
        if not self._sinks:
            return outputs
        rest = []
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                rest.append(out)
                continue
            sink.put(out)
            if out.finished and out.finish_reason is FinishReason.ABORT:
                del self._sinks[out.request_id]
        return rest

    def _apply_commands(self, engine) -> None:
        changed = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            changed = True
            kind = command[0]
            if kind == "call":
                _, fn, done = command
                try:
                    result, error = fn(engine), None
                except (ValueError, RuntimeError) as e:  # the engine's named errors
                    result, error = None, e
                except Exception as e:  # noqa: BLE001 - a bug for one request is that request's
                    logger.exception("an engine call failed")
                    result, error = None, e
                self._loop.call_soon_threadsafe(self._settle, done, result, error)
            elif kind == "held":
                _, request_id, prompt, params, sink = command
                try:
                    engine.add_request(request_id, prompt, params, hold=True)
                    self._sinks[request_id] = sink
                except ValueError as e:
                    sink.put(e)
                except Exception as e:  # noqa: BLE001 - fails this prefill, not the engine
                    logger.exception("request_id=%s could not be added", request_id)
                    sink.put(e)
            elif kind == "release":
                self._sinks.pop(command[1], None)
                engine.release(command[1])
            else:
                engine.abort_request(command[1])
        if changed:
            self._stats = engine.stats()
            self._drain_kv_events(engine)

    def _drain_kv_events(self, engine) -> None:
        # Drained even with nobody to hand them to: the engine's list must not grow.
        events = engine.drain_kv_events()
        if events and self._on_kv_events is not None:
            self._on_kv_events(events)
