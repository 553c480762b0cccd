"""The engine: model + paged KV cache + scheduler + sampler behind a synchronous
add_request / step / abort API. Not thread-safe: one thread drives it (the worker's)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from splitserve.config import ConfigError, EngineConfig
from splitserve.engine.kv_cache import KVLayout
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.types import EngineStats, FinishReason, RequestOutput, SamplingParams
from splitserve.model.config import ModelArchConfig
from splitserve.model.loader import load_model
from splitserve.model.registry import DEFAULT_MODEL_NAME, resolve_model

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot accept; the message says why, `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        t0 = time.monotonic()
        self.model_dir: Path = Path(resolve_model(config.model))
        self.arch = ModelArchConfig.from_dir(self.model_dir)
        self.model_name = config.served_model_name or (
            DEFAULT_MODEL_NAME if config.model is None else self.model_dir.name)
        self.max_model_len = self._max_model_len(config, self.arch)
        model = load_model(self.model_dir, config.dtype, config.device)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.layout = KVLayout.for_model(self.arch, config.block_size, dtype)
        num_blocks = self.layout.num_blocks_for(config.kv_cache_memory, self.max_model_len)
        if num_blocks * config.block_size < self.max_model_len:
            raise ConfigError(
                f"the KV cache holds {num_blocks} blocks x {config.block_size} tokens = "
                f"{num_blocks * config.block_size} tokens, less than one sequence of max_model_len="
                f"{self.max_model_len}; raise --kv-cache-memory (one block is "
                f"{self.layout.block_nbytes} bytes) or lower --max-model-len")
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.layout, num_blocks, config.device, config.seed)
        self.eos_token_ids = self.arch.eos_token_ids
        self._requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        self._arrivals = 0
        logger.info("engine ready in %.1fs: model=%s dtype=%s max_model_len=%d kv_blocks=%d x %d tokens (%.1f MiB)",
                    time.monotonic() - t0, self.model_dir, dtype, self.max_model_len, num_blocks,
                    config.block_size, num_blocks * self.layout.block_nbytes / 2**20)

    @staticmethod
    def _max_model_len(config: EngineConfig, arch: ModelArchConfig) -> int:
        if config.max_model_len is None:
            return arch.max_position_embeddings
        if config.max_model_len > arch.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={arch.max_position_embeddings}")
        return config.max_model_len

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.arch.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.arch.vocab_size})", "prompt")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(prompt_token_ids)} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                f"messages or completion.", "messages")
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids, self._arrivals)
        self._arrivals += 1
        self._requests[request_id] = req
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.finish(req)
        req.finish_reason = FinishReason.ABORT
        self._aborted.append(self._output(req, []))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._aborted)

    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        sched = self.scheduler.schedule()
        if sched.empty:
            return outputs
        sampled = self.runner.execute(sched)
        for s in sched.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv_manager.cache_computed_blocks(req)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.append_output(token)
            if req.check_finished(self.max_model_len):
                self.scheduler.finish(req)
                del self._requests[req.request_id]
            outputs.append(self._output(req, [token]))
        return outputs

    @staticmethod
    def _output(req: Request, new_tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, new_token_ids=new_tokens,
            finished=req.status is RequestStatus.FINISHED, finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens)

    def stats(self) -> EngineStats:
        kv = self.kv_manager
        return EngineStats(
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            kv_blocks_in_use=kv.num_used_blocks, kv_blocks_total=kv.num_blocks,
            prefix_cache_queries_tokens=kv.prefix_queries_tokens,
            prefix_cache_hits_tokens=kv.prefix_hits_tokens,
            num_preemptions=self.scheduler.num_preemptions)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Convenience for tests and benchmarks: run prompts to completion, return outputs."""
        ids = [f"gen-{self._arrivals + i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            self.add_request(rid, p, params)
        result: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self._requests for rid in ids):
            for out in self.step():
                if out.request_id in result:
                    result[out.request_id].extend(out.new_token_ids)
        return [result[rid] for rid in ids]
