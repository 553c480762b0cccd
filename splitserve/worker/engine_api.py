"""The worker's one seam to its engine: everything worker/ may ask of an engine.

Two implementations are meant to sit behind it: splitserve's own engine (AsyncEngine in
async_engine.py, which drives LLMEngine on a thread) and vLLM's. The HTTP API, the KV
port, the decode side of a transfer, the doctor routes and the KV event publisher use
only this interface, never an engine's internals.

The calls, by use:
- aggregated serving: add() -> the request's output stream; abort();
- decode side of a disaggregated request: reserve() blocks for the prompt, let the
  transfer write them (kv_memory()), then commit() -> the output stream, or abort();
- prefill side: submit_held() a prefill whose blocks stay pinned for a peer to read
  (its progress goes to a sink the transfer server's thread drains), release_held();
- describing the worker: info(), kv_memory() (its fingerprint), stats();
- KV cache events: every change goes to on_kv_events as it happens; kv_snapshot()
  hands over the whole prefix cache, meeting that stream exactly.

The seam speaks splitserve.engine's value types and errors only (types.py, errors.py):
importing it loads no engine code, no model and no torch. Refusals are those errors,
re-exported here: RequestError (the request is invalid: 400), CapacityError (no room
now: 503). EngineDeadError: the engine cannot serve at all; RequestFailed: it failed one
request and serves on.
"""

from __future__ import annotations

import enum
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from splitserve.engine.errors import CapacityError, RequestError
from splitserve.engine.types import EngineStats, RequestOutput, SamplingParams, TokenLogprobs
from splitserve.kvtypes.events import KVEvent

if TYPE_CHECKING:
    import torch

__all__ = ["CapacityError", "EngineDeadError", "EngineInfo", "EngineState", "HeldSink", "KVMemory",
           "RequestError", "RequestFailed", "WorkerEngine"]

T = TypeVar("T")

# A held prefill's outputs (each with kv_progress), or the exception that ended it.
HeldSink = queue.SimpleQueue


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class EngineDeadError(RuntimeError):
    """The engine failed (or never loaded); no request on this worker can complete."""


class RequestFailed(RuntimeError):
    """The engine failed this one request (e.g. its sampling); the engine and every other
    request go on."""


@dataclass(frozen=True)
class EngineInfo:
    """What the worker tells frontends about its model (/info, discovery)."""

    model_name: str
    model_dir: Path
    max_model_len: int
    block_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class KVMemory:
    """The engine's KV pool as a KV transfer sees it. tensor: one block per row
    ([num_blocks, ...]), read and written in place by the transfer while the engine runs
    (only rows of reserved or held requests, which the engine does not touch meanwhile).
    fingerprint: what a peer must share for those bytes to mean the same (model, layout)."""

    tensor: torch.Tensor
    fingerprint: dict[str, str]
    block_size: int

    @property
    def block_shape(self) -> list[int]:
        return list(self.tensor.shape[1:])

    @property
    def dtype(self) -> str:
        return str(self.tensor.dtype).removeprefix("torch.")


class WorkerEngine(ABC):
    """The engine as the worker sees it. Built before the event loop runs; start() on the
    loop begins the (possibly long) model load, during which state is LOADING.
    on_fatal(reason) is called on the event loop when the engine cannot load or fails;
    on_kv_events(events) gets the prefix cache's changes in order, from one thread, and
    must not block."""

    def __init__(self, on_fatal: Callable[[str], None],
                 on_kv_events: Callable[[list[KVEvent]], None] | None = None):
        self._on_fatal = on_fatal
        self._on_kv_events = on_kv_events
        self.state = EngineState.LOADING
        self.failure: str | None = None       # why, once FAILED

    # --- lifecycle and description --------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """On the event loop: begin loading the model; returns at once."""

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine; requests in flight get no further output."""

    @abstractmethod
    def info(self) -> EngineInfo | None:
        """None until the model has loaded."""

    @abstractmethod
    def kv_memory(self) -> KVMemory | None:
        """None until the model has loaded; the same object from then on."""

    @abstractmethod
    def stats(self) -> EngineStats | None:
        """The latest snapshot (None while loading); never blocks."""

    # --- requests (event loop) ------------------------------------------------------------
    @abstractmethod
    async def add(self, request_id: str, prompt_token_ids: list[int],
                  params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Admit a request and return its output stream; leaving that stream before the
        end aborts the request. Raises RequestError / EngineDeadError."""

    @abstractmethod
    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> list[int]:
        """Reserve blocks for the whole prompt, for a peer to fill; returns their ids
        (logical block i -> ids[i]), rows of kv_memory().tensor. The engine leaves them
        alone until commit() or abort(). Raises RequestError, CapacityError."""

    @abstractmethod
    async def commit(self, request_id: str, num_computed_tokens: int, first_token: int | None,
                     first_logprobs: TokenLogprobs | None = None) -> AsyncIterator[RequestOutput]:
        """The reserved blocks hold verified KV for prompt tokens [0, num_computed_tokens).
        With first_token the prefill is complete and decoding starts; without it the
        engine computes the rest of the prompt itself. first_logprobs: the first token's,
        from the peer that sampled it. Returns the output stream."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """From the event loop: end a request (running, waiting or reserved), free its
        blocks. Unknown ids are ignored."""

    # --- held prefills (any thread: the transfer server's) --------------------------------
    @abstractmethod
    def submit_held(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    sink: HeldSink) -> None:
        """Start a prefill whose KV a peer reads. Its outputs (with kv_progress: blocks
        announced ready are final) go to sink; a refusal or engine failure arrives there
        as the exception. Its blocks stay pinned until release_held()."""

    @abstractmethod
    def release_held(self, request_id: str) -> None:
        """The peer is done with (or gave up on) a held request: unpin (abort if still
        computing)."""

    # --- KV cache events ------------------------------------------------------------------
    @abstractmethod
    async def kv_snapshot(self, take: Callable[[list[KVEvent]], T]) -> T:
        """Calls take(events that rebuild the prefix cache from nothing: AllCleared, then
        every cached block) where on_kv_events runs, after every earlier change has gone
        to on_kv_events and before any later one does, and returns its result. So a
        subscriber that numbers batches in on_kv_events numbers the snapshot exactly."""
