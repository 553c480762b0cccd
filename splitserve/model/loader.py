"""Hugging Face safetensors checkpoint -> CausalLM.

The model is built on the meta device (no random init, no double memory), materialized
on the target device, then every parameter row range is filled exactly once from the
checkpoint: q/k/v land in slices of the fused qkv_proj, gate/up in slices of gate_up_proj.
Anything missing, mis-shaped or unknown is a ModelLoadError naming tensor and file,
never a silently random weight.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.model.config import DTYPES, ModelArchConfig, ModelLoadError
from splitserve.model.cpu_linear import pack_linears, packed_logits_head, should_pack
from splitserve.model.llama import CausalLM

logger = logging.getLogger(__name__)

_INDEX_FILE = "model.safetensors.index.json"
# Present in some older checkpoints; recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu",
               cpu_linear: str = "auto") -> CausalLM:
    """dtype "auto" keeps the checkpoint's torch_dtype; otherwise float32 / bfloat16 /
    float16, weights cast on load. cpu_linear: see model.cpu_linear.should_pack."""
    start = time.monotonic()
    path = Path(path)
    config = ModelArchConfig.from_dir(path)
    dtype_name = config.torch_dtype if dtype == "auto" else dtype
    if dtype_name not in DTYPES:
        raise ModelLoadError(f"dtype must be 'auto' or one of {DTYPES}, got {dtype!r}")
    files = _safetensors_files(path)
    with torch.device("meta"):
        model = CausalLM(config)
    # Cast while still on meta (free), so the device only ever holds the final dtype.
    model.to(getattr(torch, dtype_name)).to_empty(device=device)
    _load_weights(model, files)
    model.requires_grad_(False).eval()
    packed = ""
    if should_pack(cpu_linear, getattr(torch, dtype_name), torch.device(device)):
        packed = f", {pack_linears(model)} linear layers oneDNN-packed"
        if model.lm_head is None:
            model.tied_head = packed_logits_head(model.embed_tokens.weight)
    logger.info("loaded %s (%s, %s, %d file(s)%s) in %.1fs", path, config.architecture,
                dtype_name, len(files), packed, time.monotonic() - start)
    return model


def _safetensors_files(path: Path) -> list[Path]:
    index = path / _INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"cannot read the shard list in {index}: {e!r}") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shard(s) that do not exist: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {other}: convert them to safetensors)" if other else ""
        raise ModelLoadError(f"no *.safetensors weights in {path}{hint}")
    return files


def _targets(model: CausalLM) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Hugging Face tensor name -> (parameter, first row, end row) it fills."""
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size

    def whole(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return p, 0, p.shape[0]

    t = {"model.embed_tokens.weight": whole(model.embed_tokens.weight),
         "model.norm.weight": whole(model.norm.weight)}
    if model.lm_head is not None:
        t["lm_head.weight"] = whole(model.lm_head.weight)
    for i, layer in enumerate(model.layers):
        pre, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
        t[pre + "input_layernorm.weight"] = whole(layer.input_layernorm.weight)
        t[pre + "post_attention_layernorm.weight"] = whole(layer.post_attention_layernorm.weight)
        t[pre + "self_attn.o_proj.weight"] = whole(attn.o_proj.weight)
        kinds = ("weight", "bias") if cfg.attention_bias else ("weight",)
        for kind in kinds:
            fused = getattr(attn.qkv_proj, kind)
            t[pre + f"self_attn.q_proj.{kind}"] = (fused, 0, q)
            t[pre + f"self_attn.k_proj.{kind}"] = (fused, q, q + kv)
            t[pre + f"self_attn.v_proj.{kind}"] = (fused, q + kv, q + 2 * kv)
        t[pre + "mlp.gate_proj.weight"] = (mlp.gate_up_proj.weight, 0, inter)
        t[pre + "mlp.up_proj.weight"] = (mlp.gate_up_proj.weight, inter, 2 * inter)
        t[pre + "mlp.down_proj.weight"] = whole(mlp.down_proj.weight)
    return t


@torch.no_grad()
def _load_weights(model: CausalLM, files: list[Path]) -> None:
    targets = _targets(model)
    tied = model.lm_head is None
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue  # a tied checkpoint may still store a copy of the embedding
                if name not in targets:
                    raise ModelLoadError(
                        f"unexpected tensor {name!r} in {file}: not part of "
                        f"{model.config.architecture} as splitserve implements it")
                param, lo, hi = targets[name]
                want = (hi - lo, *param.shape[1:])
                got = tuple(f.get_slice(name).get_shape())
                if got != want:
                    raise ModelLoadError(f"tensor {name!r} in {file} has shape {list(got)}, "
                                         f"the config implies {list(want)}")
                param[lo:hi].copy_(f.get_tensor(name))
                loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint {files[0].parent} is missing tensor(s): {shown}")
