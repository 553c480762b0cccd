"""The engine: model + paged KV cache + scheduler + sampler behind a synchronous
add_request / step / abort API. Not thread-safe: one thread drives it (the worker's)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from splitserve.config import ConfigError, EngineConfig
from splitserve.engine.grammar import GrammarCache
from splitserve.engine.kv_cache import KVLayout
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.sampler import SampleFailure
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.errors import CapacityError, RequestError
from splitserve.engine.types import (EngineStats, FinishReason, KVProgress, RequestOutput,
                                     SamplingParams, TokenLogprobs)
from splitserve.model.config import ModelArchConfig
from splitserve.model.loader import load_model
from splitserve.model.registry import DEFAULT_MODEL_NAME, resolve_model
from splitserve.kvtypes.events import KVEvent

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, kv_allocator=None):
        """kv_allocator(shape, dtype) -> tensor: see KVLayout.allocate."""
        self.config = config
        t0 = time.monotonic()
        if config.threads is not None:
            # Process-wide: a worker process runs exactly one engine.
            torch.set_num_threads(config.threads)
        self.model_dir: Path = Path(resolve_model(config.model))
        self.arch = ModelArchConfig.from_dir(self.model_dir)
        self.model_name = config.served_model_name or (
            DEFAULT_MODEL_NAME if config.model is None else self.model_dir.name)
        self.max_model_len = self._max_model_len(config, self.arch)
        model = load_model(self.model_dir, config.dtype, config.device, config.cpu_linear)
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
        self.runner = ModelRunner(model, self.layout, num_blocks, config.device, config.seed, kv_allocator)
        self.eos_token_ids = self.arch.eos_token_ids
        # Structured output: grammars compiled for this model's tokenizer (on first use).
        self.grammars = GrammarCache(self.model_dir, self.arch.vocab_size, self.eos_token_ids)
        self._requests: dict[str, Request] = {}   # live: reserved, waiting, running or held
        self._pending: list[RequestOutput] = []   # produced outside step(), returned by the next one
        self._arrivals = 0
        self._num_computed_prompt_tokens = 0
        logger.info("engine ready in %.1fs: model=%s dtype=%s max_model_len=%d kv_blocks=%d x %d tokens "
                    "(%.1f MiB) threads=%d", time.monotonic() - t0, self.model_dir, dtype,
                    self.max_model_len, num_blocks, config.block_size,
                    num_blocks * self.layout.block_nbytes / 2**20, torch.get_num_threads())

    @staticmethod
    def _max_model_len(config: EngineConfig, arch: ModelArchConfig) -> int:
        if config.max_model_len is None:
            return arch.max_position_embeddings
        if config.max_model_len > arch.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={arch.max_position_embeddings}")
        return config.max_model_len

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold: bool = False) -> None:
        """hold=True: a peer will read this request's KV (prefill role). Its outputs carry
        kv_progress, and its blocks stay pinned after it finishes until release()."""
        self.scheduler.add(self._new_request(request_id, prompt_token_ids, params, hold))

    def _new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     hold: bool = False) -> Request:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt_token_ids if type(t) is not int or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise RequestError(f"stop token id {bad} is outside the vocabulary [0, {vocab})",
                               "stop_token_ids")
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise RequestError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})",
                               "logit_bias")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(prompt_token_ids)} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                f"messages or completion.", "messages")
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids, self._arrivals, hold)
        if params.structured is not None:
            req.grammar = self.grammars.state(params.structured)   # RequestError: invalid spec
        self._arrivals += 1
        self._requests[request_id] = req
        return req

    # --- decode side of a disaggregated request -----------------------------------------
    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """Validate the request and reserve blocks for its whole prompt, for a peer to
        fill; returns the block ids (logical block i -> ids[i]). The engine neither
        schedules nor touches these blocks until commit_reserved()."""
        req = self._new_request(request_id, prompt_token_ids, params)
        if not self.kv_manager.allocate(req, req.num_prompt_tokens):
            del self._requests[request_id]
            need = -(-req.num_prompt_tokens // self.kv_manager.block_size)
            raise CapacityError(
                f"cannot reserve {need} KV blocks for request {request_id} "
                f"({self.kv_manager.pool.num_free_blocks} of {self.kv_manager.num_blocks} free)")
        req.status = RequestStatus.RESERVED
        return list(self.kv_manager.block_table(request_id))

    def commit_reserved(self, request_id: str, num_computed_tokens: int, first_token: int | None,
                        first_logprobs: TokenLogprobs | None = None) -> None:
        """The peer's KV for prompt tokens [0, num_computed_tokens) is in the reserved
        blocks (verified). With first_token the prefill is complete and decoding starts;
        without it (fallback) the engine computes the rest of the prompt itself.
        first_logprobs: the first token's, as the peer sampled it (when asked for)."""
        req = self._requests.get(request_id)
        if req is None or req.status is not RequestStatus.RESERVED:
            raise RequestError(f"request {request_id!r} has no reservation", "request_id")
        if first_token is not None:
            if num_computed_tokens != req.num_prompt_tokens:
                raise RequestError(f"a first token needs the whole prompt's KV "
                                   f"({num_computed_tokens} of {req.num_prompt_tokens} tokens)")
            if not 0 <= first_token < self.arch.vocab_size:
                raise RequestError(f"first token {first_token} is outside the vocabulary")
        # NOTE: without a first token at least one prompt token is recomputed: its logits
        # produce the first generated token.
        n = min(num_computed_tokens, req.num_prompt_tokens - (first_token is None))
        req.num_computed_tokens = req.num_transferred_tokens = max(n, 0)
        self.kv_manager.cache_computed_blocks(req)
        req.status = RequestStatus.WAITING
        # NOTE: queued before the first token is checked: a request that finishes on it
        # (max_tokens=1, an EOS) is finished through the scheduler, which must hold it.
        self.scheduler.add(req)
        if first_token is not None:
            req.append_output(first_token)
            if req.check_finished(self.max_model_len):
                self._finish(req)
            self._pending.append(self._output(req, [first_token], logprobs=first_logprobs))

    # --- prefill side ------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """A peer is done with a held request's KV (or gave up): unpin its blocks, which
        stay in the prefix cache; abort it first if it is still computing."""
        req = self._requests.get(request_id)
        if req is None:
            return
        if req.status is RequestStatus.FINISHED:
            del self._requests[request_id]
            self.kv_manager.free(req)
        else:
            self.abort_request(request_id)

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req.status is RequestStatus.FINISHED:        # held, already reported finished
            self.kv_manager.free(req)
            return
        if req.status is RequestStatus.RESERVED:
            req.status = RequestStatus.FINISHED
            self.kv_manager.free(req)
        else:
            self.scheduler.finish(req)
        req.finish_reason = FinishReason.ABORT
        self._pending.append(self._output(req, []))

    def has_unfinished_requests(self) -> bool:
        """True when step() has work. NOTE: reserved requests (KV in flight from a peer) and
        held finished ones (a peer reading) need no steps: counting them would make the
        driving thread spin for the whole transfer."""
        return bool(self._pending) or self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.empty:
            return outputs
        sampled = self.runner.execute(sched)
        for s in sched.scheduled:
            req = s.request
            token = sampled.get(req.request_id)
            if isinstance(token, SampleFailure):
                # This request alone fails; its blocks of this step are not cached (their
                # KV may be as broken as its logits). The rest of the batch goes on.
                self._fail(req, str(token))
                outputs.append(self._output(req, [], error=str(token)))
                continue
            self._num_computed_prompt_tokens += max(
                min(req.num_computed_tokens + s.num_new_tokens, req.num_prompt_tokens)
                - req.num_computed_tokens, 0)
            req.num_computed_tokens += s.num_new_tokens
            self.kv_manager.cache_computed_blocks(req)
            if token is None:
                if req.hold:
                    outputs.append(self._output(req, []))   # progress for the peer
                continue
            req.append_output(token.token_id)
            if req.check_finished(self.max_model_len):
                self._finish(req)
            outputs.append(self._output(req, [token.token_id], logprobs=token.logprobs))
        return outputs

    def _finish(self, req: Request) -> None:
        if req.hold:
            self.scheduler.finish(req, free_blocks=False)   # stays in _requests until release()
        else:
            self.scheduler.finish(req)
            del self._requests[req.request_id]

    def _fail(self, req: Request, reason: str) -> None:
        logger.warning("request_id=%s failed: %s", req.request_id, reason)
        req.finish_reason = FinishReason.ERROR
        self._finish(req)

    def _output(self, req: Request, new_tokens: list[int], error: str | None = None,
                logprobs: TokenLogprobs | None = None) -> RequestOutput:
        progress = None
        if req.hold:
            # Once a token is sampled the prompt's blocks are all final (the sampled token's
            # KV is never computed here); before that (aborted or failed included) only
            # completely computed blocks are.
            done = req.num_prompt_tokens if req.num_output_tokens else req.num_computed_tokens
            bs = self.kv_manager.block_size
            ready = -(-done // bs) if done >= req.num_prompt_tokens else done // bs
            progress = KVProgress(min(done, req.num_prompt_tokens), ready,
                                  list(self.kv_manager.block_table(req.request_id)))
        return RequestOutput(
            request_id=req.request_id, new_token_ids=new_tokens,
            finished=req.status is RequestStatus.FINISHED, finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens,
            num_transferred_tokens=req.num_transferred_tokens, kv_progress=progress,
            error=error, logprobs=None if logprobs is None else [logprobs])

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def kv_cache(self) -> torch.Tensor:
        """The KV pool, one block per row (KVLayout): a KV transfer reads and writes the
        rows of reserved and held requests in place while the engine runs."""
        return self.runner.kv

    def fingerprint(self) -> dict[str, str]:
        """What a KV peer must share with this engine for its bytes to mean the same thing:
        the model (architecture, shapes, a hash of config.json) and the KV layout."""
        import hashlib

        from splitserve.transfer.kvmem import kv_fingerprint

        config_hash = hashlib.sha256((self.model_dir / "config.json").read_bytes()).hexdigest()[:16]
        return kv_fingerprint(self.runner.kv, **self.arch.fingerprint(), config_sha256=config_hash,
                              tensor_parallel=1)

    def drain_kv_events(self) -> list[KVEvent]:
        """The prefix cache's changes (blocks stored, removed, all cleared) since the last
        call, oldest first. Callers drain after every step and command, so the list stays
        short; nothing else reads it."""
        return self.kv_manager.pool.drain_events()

    def kv_cache_snapshot(self) -> list[KVEvent]:
        """Events that rebuild the current prefix cache from nothing (AllCleared, then
        every cached block in chain order): what a new subscriber starts from. Take it
        right after drain_kv_events() so that the two views meet exactly."""
        return self.kv_manager.pool.snapshot()

    def stats(self) -> EngineStats:
        kv = self.kv_manager
        return EngineStats(
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            kv_blocks_in_use=kv.num_used_blocks, kv_blocks_total=kv.num_blocks,
            prefix_cache_queries_tokens=kv.prefix_queries_tokens,
            prefix_cache_hits_tokens=kv.prefix_hits_tokens,
            num_pending_prefill_tokens=sum(
                max(r.num_prompt_tokens - r.num_computed_tokens, 0)
                for r in (*self.scheduler.waiting, *self.scheduler.running)),
            num_preemptions=self.scheduler.num_preemptions,
            num_computed_prompt_tokens=self._num_computed_prompt_tokens,
            num_reserved_requests=sum(r.status is RequestStatus.RESERVED for r in self._requests.values()),
            num_held_requests=sum(r.hold and r.status is RequestStatus.FINISHED for r in self._requests.values()))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Convenience for tests and benchmarks: run prompts to completion, return outputs."""
        ids = [f"gen-{self._arrivals + i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            self.add_request(rid, p, params)
        result: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self._requests and self._requests[rid].status is not RequestStatus.FINISHED
                  for rid in ids):
            for out in self.step():
                if out.request_id in result:
                    result[out.request_id].extend(out.new_token_ids)
        return [result[rid] for rid in ids]
