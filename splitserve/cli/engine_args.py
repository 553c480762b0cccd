"""Engine flags shared by `serve` and `worker`, with defaults read from EngineConfig so a
default lives in exactly one place; and the reverse, config -> flags, for child processes."""

from __future__ import annotations

import argparse
from dataclasses import fields

from splitserve.config import DTYPES, ConfigError, EngineConfig, defaults, parse_size

_HELP = {
    "model": "Hugging Face checkpoint directory (default: the embedded SmolLM2-135M-Instruct)",
    "served_model_name": "model name clients use in requests (default: derived from --model)",
    "dtype": "weights and activations dtype",
    "device": "cpu or cuda[:N]",
    "block_size": "tokens per KV cache block",
    "max_model_len": "longest sequence, prompt + output (default: the model's max_position_embeddings)",
    "max_num_seqs": "most requests in one running batch",
    "max_num_batched_tokens": "token budget of one engine step (chunked prefill beyond it)",
    "kv_cache_memory": "KV cache pool size, e.g. 2GiB (default: sized from the model)",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "seed": "engine seed for requests without their own",
}
_TYPES = {"model": str, "served_model_name": str, "device": str, "block_size": int,
          "max_model_len": int, "max_num_seqs": int, "max_num_batched_tokens": int,
          "kv_cache_memory": parse_size, "seed": int}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    d = defaults(EngineConfig)
    for f in fields(EngineConfig):
        # None defaults are explained in the help text itself.
        suffix = "" if d[f.name] is None else " (default: %(default)s)"
        kw = {"default": d[f.name], "help": _HELP[f.name] + suffix}
        if f.name == "dtype":
            group.add_argument(_flag(f.name), choices=DTYPES, **kw)
        elif f.name == "enable_prefix_caching":
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(_flag(f.name), type=_TYPES[f.name], **kw)


def engine_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EngineConfig:
    try:
        return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})
    except ConfigError as e:
        parser.error(str(e))


def engine_argv(config: EngineConfig) -> list[str]:
    """Flags that reproduce `config` (only the non-default values)."""
    d = defaults(EngineConfig)
    argv: list[str] = []
    for f in fields(EngineConfig):
        value = getattr(config, f.name)
        if value == d[f.name]:
            continue
        if isinstance(value, bool):
            argv.append(_flag(f.name) if value else "--no-" + _flag(f.name)[2:])
        else:
            argv += [_flag(f.name), str(value)]
    return argv
