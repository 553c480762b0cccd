"""GGUF file -> Hugging Face checkpoint directory (config.json, float32 safetensors,
tokenizer with its chat template), with transformers doing the reading and dequantizing.

splitserve's loader only reads safetensors; converting once (the registry caches the
result) keeps a single load path and makes GGUF models load in a second afterwards.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from splitserve.model.config import ModelLoadError

logger = logging.getLogger(__name__)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Writes the checkpoint into out_dir (which must exist). Takes ~20 s for a 135M model,
    almost all of it transformers parsing and dequantizing the GGUF tensors."""
    # Heavy import (~2 s), needed only on this path.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    logger.info("gguf conversion step 1/3: reading and dequantizing %s", gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"transformers cannot read {gguf}: {e}") from e
    not_float = [n for n, p in model.state_dict().items() if not p.is_floating_point()]
    if not_float:
        raise ModelLoadError(f"{gguf}: tensors still quantized after loading: {not_float[:5]}")
    # NOTE: transformers keeps a GGUF "quantizer" on the model and refuses save_pretrained,
    # although every weight is now a plain float32 tensor (checked just above). Dropping it
    # is what makes the model an ordinary checkpoint again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    logger.info("gguf conversion step 2/3: writing safetensors to %s", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model

    logger.info("gguf conversion step 3/3: writing tokenizer and chat template")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)
    logger.info("gguf conversion done in %.1fs", time.monotonic() - start)
