"""What the engine needs to know about a checkpoint's architecture, read from its
config.json (+ generation_config.json) and checked before any weight is touched.

Hugging Face configs drift across transformers versions (rope_theta/rope_scaling became
rope_parameters in v5, torch_dtype became dtype, "type" became "rope_type"); this module
is the one place that knows every spelling, so the rest of splitserve sees one shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelLoadError(Exception):
    """The checkpoint cannot be served: unsupported architecture or feature, missing file,
    missing or mis-shaped tensor. The message names the file / tensor / field."""


# architecture -> does it carry q/k/v biases. Mistral (without a sliding window) is Llama.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False,
                           "Qwen2ForCausalLM": True}
DTYPES = ("float32", "bfloat16", "float16")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
DEFAULT_ROPE_THETA = 10000.0  # the transformers default for Llama and Qwen2


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None = plain RoPE; otherwise {"rope_type": "llama3", *LLAMA3_ROPE_KEYS}.
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool         # bias on q/k/v only (Qwen2); o_proj never has one
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def __post_init__(self) -> None:
        _check_architecture(self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads ({self.num_heads}) must be a multiple of "
                                 f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ModelLoadError(f"rms_norm_eps and rope_theta must be positive, got "
                                 f"{self.rms_norm_eps!r} and {self.rope_theta!r}")
        if self.torch_dtype not in DTYPES:
            raise ModelLoadError(f"torch_dtype {self.torch_dtype!r} is not one of {DTYPES}")
        if self.rope_scaling is not None:
            _check_llama3_rope(self.rope_scaling)
        if any(not isinstance(t, int) for t in self.eos_token_ids):
            raise ModelLoadError(f"eos_token_ids must be integers, got {self.eos_token_ids!r}")

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArchConfig":
        path = Path(path)
        cfg = _read_json(path / "config.json")
        gen_path = path / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        try:
            return cls._from_dicts(cfg, gen)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path / 'config.json'}: {e}") from None

    @classmethod
    def _from_dicts(cls, cfg: dict[str, Any], gen: dict[str, Any]) -> "ModelArchConfig":
        archs = cfg.get("architectures") or []
        if len(archs) != 1:
            raise ModelLoadError(f"expected exactly one entry in 'architectures', got {archs!r}")
        arch = archs[0]
        _check_architecture(arch)  # first, so the error names it rather than a missing field
        _reject_unsupported_features(arch, cfg)
        hidden, heads = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
        theta, scaling = _rope(cfg)
        eos = _ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id"))
        bos = cfg.get("bos_token_id", gen.get("bos_token_id"))
        return cls(
            architecture=arch,
            vocab_size=_req(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req(cfg, "intermediate_size"),
            num_layers=_req(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_req(cfg, "max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=SUPPORTED_ARCHITECTURES[arch],
            torch_dtype=_dtype(cfg),
            eos_token_ids=tuple(dict.fromkeys(eos)),  # union, first-seen order
            bos_token_id=bos,
        )

    def fingerprint(self) -> dict:
        """The fields that decide whether two processes' KV caches are interchangeable."""
        return {"architecture": self.architecture, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size}


def _check_architecture(arch: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture {arch!r}; splitserve serves "
                             f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: a checkpoint directory needs config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _req(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ModelLoadError(f"required field {key!r} is missing")
    return cfg[key]


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _dtype(cfg: dict[str, Any]) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.")


def _reject_unsupported_features(arch: str, cfg: dict[str, Any]) -> None:
    """Fields the model does not implement must not be silently ignored: the result would
    load fine and produce wrong tokens."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias"):
        raise ModelLoadError("mlp_bias=true is not supported")
    if arch != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
        raise ModelLoadError(f"attention_bias=true on {arch} (biased o_proj) is not supported")
    window = cfg.get("sliding_window")
    uses_window = (cfg.get("use_sliding_window", False) if arch == "Qwen2ForCausalLM"
                   else window is not None and window < cfg.get("max_position_embeddings", 0))
    layer_types = set(cfg.get("layer_types") or ["full_attention"])
    if uses_window or layer_types != {"full_attention"}:
        raise ModelLoadError(f"sliding-window attention (sliding_window={window!r}) is not supported")


def _rope(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, normalized scaling) from any of the config spellings:
    v5 `rope_parameters` (theta inside), or `rope_theta` + `rope_scaling` with "type" or
    "rope_type"."""
    if cfg.get("rope_parameters") is not None:
        params = dict(cfg["rope_parameters"])
        theta = params.pop("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA))
    else:
        params = dict(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", DEFAULT_ROPE_THETA)
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(f"per-layer-type rope parameters are not supported: {params!r}")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ModelLoadError(f"rope type {rope_type!r} is not supported (supported: default, llama3)")
    missing = [k for k in LLAMA3_ROPE_KEYS if params.get(k) is None]
    if missing:
        raise ModelLoadError(f"llama3 rope scaling is missing {missing}")
    scaling = {"rope_type": "llama3", "factor": float(params["factor"]),
               "low_freq_factor": float(params["low_freq_factor"]),
               "high_freq_factor": float(params["high_freq_factor"]),
               "original_max_position_embeddings": int(params["original_max_position_embeddings"])}
    return float(theta), scaling


def _check_llama3_rope(s: dict) -> None:
    if s.get("rope_type") != "llama3" or any(s.get(k) is None for k in LLAMA3_ROPE_KEYS):
        raise ModelLoadError(f"rope_scaling must be None or llama3 with {LLAMA3_ROPE_KEYS}, got {s!r}")
    if not (s["factor"] > 0 and 0 < s["low_freq_factor"] < s["high_freq_factor"]
            and s["original_max_position_embeddings"] > 0):
        raise ModelLoadError(f"llama3 rope scaling needs factor > 0 and "
                             f"0 < low_freq_factor < high_freq_factor, got {s!r}")
