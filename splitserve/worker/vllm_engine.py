"""vLLM behind the worker's engine seam (engine_api.WorkerEngine): `--engine vllm`.

vLLM's AsyncLLM runs in this process, on the worker's event loop; its scheduler and model
run in processes of its own (EngineCore, and one worker process per tensor-parallel
rank), which it starts and stops. Building it takes a while (spawning those processes,
loading the weights, sizing the KV cache), so it is built on a thread while the HTTP
server already answers /live and /health (503, loading).

What the worker gets from it:
- requests: add() turns our SamplingParams into vLLM's (vllm_sampling.py) and vLLM's
  output deltas into our RequestOutput stream; abort();
- stats(): vLLM's scheduler stats (vllm_stats.py) plus the prompt tokens of requests
  still waiting for their first token (the router's view of queued prefill work);
- KV events: vLLM publishes its prefix cache's changes (vllm_kv_listener.py), which are
  re-hashed into the block hashes our router computes (vllm_kv_translate.py).

A prefill or decode worker (connector set) runs vLLM with SplitserveConnector
(vllm_kv_transfer.py): KV moves inside vLLM, between its worker processes, not through
this seam (reserve/commit and held prefills are refused here); requests name their
transfer through kv_transfer_params (add(), vllm_disagg.py), and the connector's transfer
reports (counters, incidents, each load's tokens and seconds) reach the worker through
vLLM's stats (vllm_stats.py, ConnectorReports).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from splitserve.config import EngineConfig
from splitserve.engine.types import EngineStats, RequestOutput, SamplingParams, TokenLogprobs
from splitserve.kvtypes.events import AllCleared, KVEvent
from splitserve.worker.config import SECRET_ENV
from splitserve.worker.engine_api import (
    CapacityError, EngineDeadError, EngineInfo, EngineState, HeldSink, KVMemory, RequestError,
    RequestFailed, WorkerEngine)
from splitserve.worker.vllm_disagg import ConnectorEngine
from splitserve.worker.vllm_kv_listener import VllmKVEventListener
from splitserve.worker.vllm_kv_transfer import (ConnectorReports, ConnectorSettings,
                                               read_rank_states)
from splitserve.worker.vllm_kv_translate import VllmKVTranslator
from splitserve.worker.vllm_model import eos_token_ids, local_dir, model_argument, model_name
from splitserve.worker.vllm_options import VllmOptions, cpu_thread_env, engine_kwargs, fit_platform
from splitserve.worker.vllm_sampling import from_vllm, to_vllm

logger = logging.getLogger(__name__)

T = TypeVar("T")

_HEALTH_POLL_S = 1.0
_NO_KV_SEAM = ("vLLM workers move KV through vLLM's KV connector (SplitserveConnector), not "
               "through the worker's reserve/commit seam")


class VllmEngine(WorkerEngine, ConnectorEngine):
    def __init__(self, config: EngineConfig, options: VllmOptions,
                 on_fatal: Callable[[str], None],
                 on_kv_events: Callable[[list[KVEvent]], None] | None = None,
                 connector: ConnectorSettings | None = None):
        """connector: a prefill or decode worker's KV connector (None: aggregated)."""
        super().__init__(on_fatal, on_kv_events)
        self._config = config
        self._options = options
        self.connector = connector
        # Where the connector's reports go (the worker's /metrics, /incidents, the
        # requests' transferred tokens): set by the worker before start(); touched on the
        # event loop only (vLLM's stat loggers run there).
        self.reports: ConnectorReports | None = None
        self._llm: Any = None               # vllm AsyncLLM, once built
        self._info: EngineInfo | None = None
        self._stats: EngineStats | None = None
        # Request id -> its prompt tokens not computed yet (0 from its first output on).
        # Event loop only.
        self._live: dict[str, int] = {}
        # Request id -> vLLM's abort of it, while under way: an id added again (a decode
        # worker computing a refused prefill itself) waits for it. Event loop only.
        self._aborting: dict[str, asyncio.Task] = {}
        # Where the connector's ranks describe their KV (doctor's probes); removed with
        # the engine object.
        self._state_dir = tempfile.TemporaryDirectory(prefix="splitserve-vllm-kv-")
        self._translator: VllmKVTranslator | None = None
        self._listener = VllmKVEventListener(self._on_vllm_events, self._on_events_lost)
        # NOTE: held while a batch of events is translated and handed to on_kv_events, and
        # while a snapshot is taken: a snapshot always falls between two batches.
        self._events_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()      # aborts and watchers in flight
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle and description --------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn(self._load())

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._llm is not None:
            self._llm.shutdown(timeout=timeout)
        self._listener.close()

    def info(self) -> EngineInfo | None:
        return self._info

    def kv_memory(self) -> KVMemory | None:
        """None: vLLM's KV cache lives in its own worker processes (kv_ranks says what
        it is)."""
        return None

    def kv_ranks(self) -> list[dict[str, Any]]:
        ranks = read_rank_states(self._state_dir.name)
        return ranks if len(ranks) == self._options.tensor_parallel_size else []

    def stats(self) -> EngineStats | None:
        if self._stats is None:
            return None
        return dataclasses.replace(self._stats, num_pending_prefill_tokens=sum(self._live.values()))

    # --- requests -------------------------------------------------------------------------
    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  kv_transfer_params: dict[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        """kv_transfer_params: the connector's per-request instructions (vllm_disagg.py)."""
        llm = self._ready()
        if request_id in self._aborting:
            await asyncio.shield(self._aborting[request_id])
        if request_id in self._live:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        sampling = to_vllm(request_id, params)
        if kv_transfer_params is not None:
            if self.connector is None:
                raise RequestError("this vLLM worker has no KV connector (it is aggregated)",
                                   "prefill")
            # Where vLLM's OpenAI server puts them too (vllm.v1.request.Request reads them).
            sampling.extra_args = {**(sampling.extra_args or {}),
                                   "kv_transfer_params": dict(kv_transfer_params)}
        try:
            collector = await llm.add_request(request_id, tokens_input(list(prompt_token_ids)),
                                              sampling)
        except (VLLMClientError, ValueError) as e:
            raise RequestError(str(e), getattr(e, "parameter", None) or "prompt") from e
        except GracefulHTTPError as e:
            raise CapacityError(str(e)) from e
        except VllmEngineDead as e:
            raise EngineDeadError(f"the vLLM engine died: {e}") from e
        self._live[request_id] = len(prompt_token_ids)
        return self._iterate(request_id, collector, len(prompt_token_ids), params.logprobs)

    async def _iterate(self, request_id: str, collector: Any, num_prompt_tokens: int,
                       num_logprobs: int | None) -> AsyncIterator[RequestOutput]:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead
        finished = False
        try:
            while not finished:
                try:
                    out = collector.get_nowait() or await collector.get()
                except VllmEngineDead as e:
                    raise EngineDeadError(f"the vLLM engine died: {e}") from e
                except Exception as e:  # noqa: BLE001 - vLLM failed this request only
                    logger.exception("request_id=%s failed in vLLM", request_id)
                    raise RequestFailed(f"vLLM failed this request: {e}") from e
                self._live[request_id] = 0
                item = from_vllm(request_id, out, num_prompt_tokens, num_logprobs)
                finished = item.finished
                if item.error is not None:
                    raise RequestFailed(item.error)
                yield item
        finally:
            self._live.pop(request_id, None)
            collector.close()
            if not finished:
                logger.info("request_id=%s aborted by its caller", request_id)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        # A stream never iterated has no finally to do it: its prompt is no longer pending.
        self._live.pop(request_id, None)
        if self._llm is not None and not self._stopping:
            task = self._spawn(self._llm.abort(request_id))
            self._aborting[request_id] = task
            task.add_done_callback(lambda t: self._aborting.pop(request_id, None)
                                   if self._aborting.get(request_id) is t else None)

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> list[int]:
        raise RequestError(_NO_KV_SEAM, "prefill")

    async def commit(self, request_id: str, num_computed_tokens: int, first_token: int | None,
                     first_logprobs: TokenLogprobs | None = None) -> AsyncIterator[RequestOutput]:
        raise RequestError(_NO_KV_SEAM, "prefill")

    def submit_held(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    sink: HeldSink) -> None:
        sink.put(RequestError(_NO_KV_SEAM, "prefill"))

    def release_held(self, request_id: str) -> None:
        """submit_held never holds anything here, so there is nothing to release."""

    # --- KV cache events ------------------------------------------------------------------
    async def kv_snapshot(self, take: Callable[[list[KVEvent]], T]) -> T:
        self._ready()
        with self._events_lock:
            return take(self._translator.snapshot())

    def _on_vllm_events(self, events: list[Any]) -> None:
        """The listener thread: one batch of vLLM's events, in order."""
        with self._events_lock:
            ours = self._translator.translate(events)
            if ours and self._on_kv_events is not None:
                self._on_kv_events(ours)

    def _on_events_lost(self) -> None:
        with self._events_lock:
            self._translator.clear()
            if self._on_kv_events is not None:
                self._on_kv_events([AllCleared()])

    # --- loading --------------------------------------------------------------------------
    async def _load(self) -> None:
        try:
            llm = await asyncio.to_thread(self._build)
        except Exception as e:  # noqa: BLE001 - any load failure ends this worker
            logger.exception("vLLM engine failed to load")
            self._fail(f"model load failed: {e}")
            return
        if self._stopping:
            llm.shutdown()
            return
        self._llm = llm
        self._stats = EngineStats(kv_blocks_total=llm.vllm_config.cache_config.num_gpu_blocks or 0)
        self.state = EngineState.READY
        logger.info("engine ready: %s",
                    " ".join(f"{k}={v}" for k, v in self._fingerprint(llm).items()))
        self._spawn(self._watch(llm))

    def _build(self) -> Any:
        """On a thread: start vLLM (its processes, weights, KV cache). Returns the AsyncLLM."""
        model = model_argument(self._config.model)
        os.environ.update(cpu_thread_env(self._config.threads, self._options.tensor_parallel_size))
        from vllm.config.kv_events import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from splitserve.worker.vllm_stats import VllmStatsCollector

        events = KVEventsConfig(enable_kv_cache_events=self._config.enable_prefix_caching,
                                publisher="zmq", endpoint=self._listener.endpoint,
                                replay_endpoint=self._listener.replay_endpoint)
        kwargs = fit_platform(engine_kwargs(self._config, self._options, model),
                              current_platform.is_cpu())
        if self.connector is not None:
            from vllm.config import KVTransferConfig
            kwargs["kv_transfer_config"] = KVTransferConfig(
                **self.connector.kv_transfer_config(self._state_dir.name))
            if self.connector.transfer.secret is not None:
                # vLLM's processes inherit it; its logged config never holds it.
                os.environ[SECRET_ENV] = self.connector.transfer.secret
        args = AsyncEngineArgs(**kwargs, kv_events_config=events, disable_log_stats=True)
        collector = functools.partial(VllmStatsCollector, on_stats=self._on_stats,
                                      on_transfers=self._on_transfers)
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[collector])
        try:
            block_size = llm.vllm_config.cache_config.block_size
            self._translator = VllmKVTranslator(block_size)
            self._listener.start()
            mc = llm.model_config
            self._info = EngineInfo(
                model_name=self._config.served_model_name or model_name(self._config.model, model),
                model_dir=local_dir(model), max_model_len=mc.max_model_len,
                block_size=block_size, eos_token_ids=eos_token_ids(mc))
        except BaseException:
            llm.shutdown()
            raise
        return llm

    def _on_stats(self, stats: EngineStats) -> None:
        self._stats = stats

    def _on_transfers(self, data: dict[str, Any]) -> None:
        if self.reports is not None:
            self.reports.add(data)

    async def _watch(self, llm: Any) -> None:
        """vLLM's engine processes can die between requests too: notice it then."""
        while not llm.errored:
            await asyncio.sleep(_HEALTH_POLL_S)
        self._fail(f"the vLLM engine died: {llm.dead_error}")

    def _fail(self, reason: str) -> None:
        if self.state is EngineState.FAILED or self._stopping:
            return
        self.state = EngineState.FAILED
        self.failure = reason
        self._on_fatal(reason)

    def _ready(self) -> Any:
        if self.state is not EngineState.READY:
            raise EngineDeadError(f"engine is {self.state.value}")
        return self._llm

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fingerprint(self, llm: Any) -> dict[str, str]:
        """What this worker's KV means (what a KV hand-off between two vLLM workers must
        agree on), for the log."""
        import vllm
        mc, cc = llm.model_config, llm.vllm_config.cache_config
        return {"engine": "vllm", "vllm_version": vllm.__version__, "model": str(mc.model),
                "dtype": str(mc.dtype).removeprefix("torch."), "block_size": str(cc.block_size),
                "max_model_len": str(mc.max_model_len),
                "tensor_parallel_size": str(llm.vllm_config.parallel_config.tensor_parallel_size)}
