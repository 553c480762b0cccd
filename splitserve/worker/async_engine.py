"""splitserve's own engine behind the worker's engine seam (engine_api.WorkerEngine):
drives the synchronous, single-threaded LLMEngine from asyncio.

The engine lives on one dedicated thread: it is built there (so the HTTP server can
answer /live and /health while the model loads), and every request reaches it through a
command queue of typed commands (_Call, _Hold, _Release, _Abort), because LLMEngine is
not thread-safe. Outputs travel back to the event loop with call_soon_threadsafe into
one asyncio.Queue per request. When there is nothing to do the thread sleeps on an Event
instead of spinning. KV events are drained on that thread after every step and command.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from splitserve.engine.grammar import GrammarCache
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.types import EngineStats, FinishReason, RequestOutput, SamplingParams, TokenLogprobs
from splitserve.kvtypes.events import KVEvent
from splitserve.worker.engine_api import (
    EngineDeadError, EngineInfo, EngineState, HeldSink, KVMemory, RequestError, RequestFailed,
    WorkerEngine)

logger = logging.getLogger(__name__)

T = TypeVar("T")


# --- commands to the engine thread ----------------------------------------------------------
@dataclass(frozen=True)
class _Call:
    """Run fn(engine) there; settle `done` (a future of the event loop) with its outcome."""

    fn: Callable[[LLMEngine], Any]
    done: asyncio.Future


@dataclass(frozen=True)
class _Hold:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: HeldSink


@dataclass(frozen=True)
class _Release:
    request_id: str


@dataclass(frozen=True)
class _Abort:
    request_id: str


_Command = Union[_Call, _Hold, _Release, _Abort]


class AsyncEngine(WorkerEngine):
    def __init__(self, factory: Callable[[], LLMEngine], on_fatal: Callable[[str], None],
                 on_kv_events: Callable[[list[KVEvent]], None] | None = None):
        """factory builds the LLMEngine (on the engine thread); on_kv_events runs on the
        engine thread, after every step and command that changed the prefix cache."""
        super().__init__(on_fatal, on_kv_events)
        self._factory = factory
        # Set on the engine thread before state turns READY, immutable from then on.
        self._info: EngineInfo | None = None
        self._kv_memory: KVMemory | None = None
        self._stats: EngineStats | None = None
        self._grammars: GrammarCache | None = None   # the engine's; thread-safe
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._streams: dict[str, asyncio.Queue] = {}  # touched on the event loop thread only
        self._sinks: dict[str, HeldSink] = {}  # held prefills; engine thread only
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

    def info(self) -> EngineInfo | None:
        return self._info

    def kv_memory(self) -> KVMemory | None:
        return self._kv_memory

    def stats(self) -> EngineStats | None:
        """The snapshot taken after the engine's latest step (None while loading)."""
        return self._stats

    async def _compile_grammar(self, params: SamplingParams) -> None:
        """A structured request's grammar is compiled (and on a worker's first one, the
        tokenizer loaded: seconds) on a thread, into the engine's cache, so the engine
        thread finds it there instead of stalling every running request. An invalid spec
        raises RequestError here, as the engine would."""
        if params.structured is not None and self._grammars is not None:
            await asyncio.to_thread(self._grammars.compile, params.structured)

    async def add(self, request_id: str, prompt_token_ids: list[int],
                  params: SamplingParams) -> AsyncIterator[RequestOutput]:
        await self._compile_grammar(params)
        return await self._open_stream(
            request_id, lambda e: e.add_request(request_id, prompt_token_ids, params))

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> list[int]:
        await self._compile_grammar(params)
        return await self._call(lambda e: e.reserve(request_id, prompt_token_ids, params))

    async def commit(self, request_id: str, num_computed_tokens: int, first_token: int | None,
                     first_logprobs: TokenLogprobs | None = None) -> AsyncIterator[RequestOutput]:
        return await self._open_stream(
            request_id, lambda e: e.commit_reserved(request_id, num_computed_tokens, first_token,
                                                    first_logprobs))

    async def kv_snapshot(self, take: Callable[[list[KVEvent]], T]) -> T:
        def flush_then_take(engine: LLMEngine) -> T:
            self._drain_kv_events(engine)
            return take(engine.kv_cache_snapshot())
        return await self._call(flush_then_take)

    def submit_held(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    sink: HeldSink) -> None:
        # NOTE: called on a KV transfer job's thread (prefill_backend.py), never the engine's:
        # a structured request's grammar is compiled here, and a failure reaches the peer.
        if params.structured is not None and self._grammars is not None:
            self._grammars.compile(params.structured)
        self._send(_Hold(request_id, prompt_token_ids, params, sink))

    def release_held(self, request_id: str) -> None:
        self._send(_Release(request_id))

    def abort(self, request_id: str) -> None:
        # Its stream too: an output stream never iterated has no finally to drop it.
        self._streams.pop(request_id, None)
        self._send(_Abort(request_id))

    async def _open_stream(self, request_id: str,
                           start: Callable[[LLMEngine], None]) -> AsyncIterator[RequestOutput]:
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
            await self._call(start)
        except BaseException:
            # Refused, or our caller was cancelled while waiting: either way nobody will
            # read this stream, and the engine must not keep the request.
            self._streams.pop(request_id, None)
            self.abort(request_id)
            raise
        return self._iterate(request_id, outputs)

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread; its result or exception comes back here.
        ValueError/RuntimeError subclasses (the engine's named errors) are expected; any
        other exception is logged but also only fails this call, never the engine."""
        if self.state is not EngineState.READY:
            raise EngineDeadError(f"engine is {self.state.value}")
        done = self._loop.create_future()
        self._send(_Call(fn, done))
        return await done

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

    def _send(self, command: _Command) -> None:
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
            # The fingerprint reads the model's config.json: once, here, not per transfer.
            self._info = EngineInfo(engine.model_name, engine.model_dir, engine.max_model_len,
                                    engine.block_size, tuple(engine.eos_token_ids))
            self._kv_memory = KVMemory(engine.kv_cache, engine.fingerprint(), engine.block_size)
            self._grammars = engine.grammars
        except Exception as e:
            logger.exception("model load failed")
            self._loop.call_soon_threadsafe(self._fail_all, f"model load failed: {e}")
            return
        self._stats = engine.stats()
        self.state = EngineState.READY
        logger.info("engine ready: model=%s max_model_len=%d", engine.model_name, engine.max_model_len)
        try:
            self._loop_forever(engine)
        except Exception as e:
            logger.exception("engine step failed")
            self._loop.call_soon_threadsafe(self._fail_all, f"engine failed: {e}")

    def _loop_forever(self, engine: LLMEngine) -> None:
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

    def _apply_commands(self, engine: LLMEngine) -> None:
        changed = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            changed = True
            if isinstance(command, _Call):
                try:
                    result, error = command.fn(engine), None
                except (ValueError, RuntimeError) as e:  # the engine's named errors
                    result, error = None, e
                except Exception as e:  # noqa: BLE001 - a bug for one request is that request's
                    logger.exception("an engine call failed")
                    result, error = None, e
                self._loop.call_soon_threadsafe(self._settle, command.done, result, error)
            elif isinstance(command, _Hold):
                rid = command.request_id
                try:
                    engine.add_request(rid, command.prompt_token_ids, command.params, hold=True)
                    self._sinks[rid] = command.sink
                except ValueError as e:
                    command.sink.put(e)
                except Exception as e:  # noqa: BLE001 - fails this prefill, not the engine
                    logger.exception("request_id=%s could not be added", rid)
                    command.sink.put(e)
            elif isinstance(command, _Release):
                self._sinks.pop(command.request_id, None)
                engine.release(command.request_id)
            else:
                engine.abort_request(command.request_id)
        if changed:
            self._stats = engine.stats()
            self._drain_kv_events(engine)

    def _drain_kv_events(self, engine: LLMEngine) -> None:
        # Drained even with nobody to hand them to: the engine's list must not grow.
        events = engine.drain_kv_events()
        if events and self._on_kv_events is not None:
            self._on_kv_events(events)
