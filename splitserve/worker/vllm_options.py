"""What a vLLM worker (`--engine vllm`) passes to vLLM's engine, and how.

splitserve's EngineConfig (model, dtype, max_model_len, ...) maps onto vLLM's engine
arguments field by field; VllmOptions holds what only vLLM has (tensor parallelism, GPU
memory share, eager mode) plus any other engine argument as `--vllm-arg KEY=VALUE`.
Nothing here imports vLLM: the CLI checks flags without loading it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from splitserve.config import ConfigError, EngineConfig, defaults

ENGINES = ("splitserve", "vllm")

# Engine arguments the worker sets itself: through its own flags, or because the
# worker's contract depends on them (KV events feed the router, stats feed /metrics).
_OWN_ARGS = {
    "model": "--model", "served_model_name": "--served-model-name", "dtype": "--dtype",
    "block_size": "--block-size", "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-num-batched-tokens",
    "kv_cache_memory_bytes": "--kv-cache-memory", "enable_prefix_caching":
        "--enable-prefix-caching", "seed": "--seed", "tensor_parallel_size":
        "--tensor-parallel-size", "gpu_memory_utilization": "--gpu-memory-utilization",
    "enforce_eager": "--enforce-eager", "kv_events_config": None, "disable_log_stats": None,
}
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class VllmOptions:
    """tensor_parallel_size: GPUs (or CPU rank groups) one worker spans.
    gpu_memory_utilization: share of GPU memory vLLM may take (None: vLLM's default).
    extra_args: other AsyncEngineArgs fields, (name, value) pairs."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    extra_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be at least 1, got "
                              f"{self.tensor_parallel_size!r}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization!r}")
        for key, _ in self.extra_args:
            if not _KEY.match(key):
                raise ConfigError(f"--vllm-arg {key!r}: expected a vLLM engine argument name "
                                  "such as max_num_partial_prefills")
            if key in _OWN_ARGS:
                flag = _OWN_ARGS[key]
                how = f"use {flag}" if flag else "the worker sets it itself"
                raise ConfigError(f"--vllm-arg {key}: {how}")


def parse_vllm_arg(text: str) -> tuple[str, Any]:
    """'max-num-partial-prefills=2' -> ('max_num_partial_prefills', 2). The value is JSON
    when it parses as JSON (numbers, true/false, lists, objects), else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--vllm-arg expects KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def engine_kwargs(config: EngineConfig, options: VllmOptions, model: str) -> dict[str, Any]:
    """AsyncEngineArgs keywords for `config` (kv events and stats are added by the engine).

    NOTE: block_size at EngineConfig's default (our engine's 16) is left to vLLM, whose
    default depends on its platform and attention backend (16 on CUDA; 128 on CPU, where
    only multiples of 32 work). `serve` forwards only non-default flags, so a worker sees
    --block-size exactly when the user chose one."""
    if config.cpu_linear != defaults(EngineConfig)["cpu_linear"]:
        raise ConfigError("--cpu-linear sets splitserve's own engine; vLLM chooses its CPU "
                          "matmuls itself (it prepacks for oneDNN)")
    kwargs: dict[str, Any] = {
        "model": model, "dtype": config.dtype, "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "enable_prefix_caching": config.enable_prefix_caching, "seed": config.seed,
        "tensor_parallel_size": options.tensor_parallel_size,
        "enforce_eager": options.enforce_eager,
    }
    if config.served_model_name:
        kwargs["served_model_name"] = config.served_model_name
    if config.block_size != defaults(EngineConfig)["block_size"]:
        kwargs["block_size"] = config.block_size
    if config.kv_cache_memory is not None:
        kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory
    if options.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    kwargs.update(options.extra_args)
    return kwargs


def cpu_thread_env(threads: int | None, tensor_parallel_size: int,
                   environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for vLLM's CPU build so that a worker uses the cores `--threads` gives
    it (as our engine does): VLLM_CPU_OMP_THREADS_BIND set by the user wins. By default
    vLLM binds to all cores but one, which it reserves; a worker given every core it may
    run on binds them all (split among TP ranks), one given fewer does not bind (several
    workers share the machine) and runs that many OpenMP threads. GPU builds ignore it."""
    environ = os.environ if environ is None else environ
    if "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    wanted = threads or len(cores)
    per_rank = len(cores) // tensor_parallel_size
    if wanted >= len(cores) and per_rank >= 1:
        groups = [cores[r * per_rank:(r + 1) * per_rank] for r in range(tensor_parallel_size)]
        return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, g)) for g in groups)}
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": str(max(1, wanted // tensor_parallel_size))}


def cpu_core_slices(workers: int, tensor_parallel_size: int,
                    environ: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Environment for each of `serve`'s vLLM workers on one machine: on a CPU build, each
    its own cores (TP ranks split them with '|'), so that one worker's spinning OpenMP
    threads, or a decode engine stepping while it waits for its KV, never take the cores
    another computes on (both on every core, a prefill of a few tokens took seconds on 2
    cores). Nothing when the user set VLLM_CPU_OMP_THREADS_BIND, for one worker, or with
    too few cores for a slice each. GPU builds ignore it."""
    environ = os.environ if environ is None else environ
    cores = sorted(os.sched_getaffinity(0))
    per_rank = len(cores) // (workers * tensor_parallel_size)
    if workers < 2 or "VLLM_CPU_OMP_THREADS_BIND" in environ or per_rank < 1:
        return [{} for _ in range(workers)]
    slices = []
    for w in range(workers):
        ranks = [cores[(w * tensor_parallel_size + r) * per_rank:
                       (w * tensor_parallel_size + r + 1) * per_rank]
                 for r in range(tensor_parallel_size)]
        slices.append({"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, g)) for g in ranks)})
    return slices


# vLLM's CPU build sizes its KV cache, by default, as a share (0.92) of the machine's
# memory, and refuses to start when other processes hold more than the rest. A worker
# without --kv-cache-memory gets our engine's default cap instead.
CPU_DEFAULT_KV_CACHE_BYTES = 2 * 1024**3


def fit_platform(kwargs: dict[str, Any], is_cpu: bool,
                 environ: dict[str, str] | None = None) -> dict[str, Any]:
    """kwargs for vLLM's platform: on CPU the KV cache default above (unless
    $VLLM_CPU_KVCACHE_SPACE sets it), and a block size vLLM's CPU attention can use, refused
    here rather than from deep inside vLLM's processes ("Engine core initialization
    failed")."""
    if not is_cpu:
        return kwargs
    environ = os.environ if environ is None else environ
    size = kwargs.get("block_size")
    if size is not None and size % 32:
        raise ConfigError(f"vLLM's CPU build needs --block-size to be a multiple of 32, got {size}")
    if "kv_cache_memory_bytes" not in kwargs and not environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {**kwargs, "kv_cache_memory_bytes": CPU_DEFAULT_KV_CACHE_BYTES}
    return kwargs
