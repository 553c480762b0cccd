"""Which model a vLLM worker loads, and how it describes it (name, tokenizer directory,
EOS ids) in the same terms as a worker on our engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitserve.worker.tokenizer_files import TOKENIZER_FILE_NAMES


def model_argument(model: str | None) -> str:
    """What vLLM loads: a local checkpoint directory as is; the embedded default or a .gguf
    converted once into our cache (as our engine does); anything else is vLLM's to
    resolve (a Hugging Face model id, which vLLM downloads)."""
    path = Path(model).expanduser() if model is not None else None
    if path is not None and path.is_dir():
        return str(path.absolute())
    if path is None or path.suffix == ".gguf":
        from splitserve.model.registry import resolve_model
        return str(resolve_model(model))
    return model


def model_name(model: str | None, loaded: str) -> str:
    """As our engine names it (the default's name, a directory's name), and a Hugging Face
    id as vLLM does: the id itself."""
    from splitserve.model.registry import DEFAULT_MODEL_NAME
    if model is None:
        return DEFAULT_MODEL_NAME
    return Path(loaded).name if Path(loaded).is_dir() else model


def local_dir(model: str) -> Path:
    """Where the tokenizer files are: the directory, or a Hugging Face id's snapshot in
    the local cache (vLLM downloaded it)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(model, local_files_only=True,
                                  allow_patterns=list(TOKENIZER_FILE_NAMES)))


def eos_token_ids(model_config: Any) -> tuple[int, ...]:
    """The model's EOS ids as ours reads them: config.json's, then generation_config's."""
    ids: list[int] = []
    for value in (model_config.hf_config.eos_token_id,
                  model_config.try_get_generation_config().get("eos_token_id")):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return tuple(dict.fromkeys(ids))
