"""The tokenizer and chat template a worker's model ships with, served to frontends
(GET /tokenizer), so a frontend on another host needs no copy of the model files.

The files are read once, right after the model has loaded, and kept in memory: a worker
hands out the tokenizer of the model it actually loaded, even if its directory changes or
disappears later. Only the fixed set of names below is ever read or written, so neither
side can be made to touch any other path.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec

from splitserve.worker.engine_api import EngineState, WorkerEngine

logger = logging.getLogger(__name__)

# What transformers' AutoTokenizer reads from a checkpoint directory: the tokenizer
# itself (fast JSON, SentencePiece, or BPE vocab + merges), its config (chat template,
# special tokens) and config.json (the model type, for configs that name no tokenizer
# class). Never weights.
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "chat_template.jinja", "chat_template.json",
                        "tokenizer.model", "vocab.json", "merges.txt", "config.json")
# Llama 3's tokenizer.json is 9 MB; the largest vocabularies stay well under this.
MAX_TOTAL_BYTES = 64 * 2**20


class TokenizerBundle(msgspec.Struct):
    """GET /tokenizer body: file name -> contents (base64 in JSON)."""

    files: dict[str, bytes]


class TokenizerFileError(Exception):
    """A tokenizer file is missing, unreadable, too big or not one of the known names."""


def read_tokenizer_files(model_dir: Path) -> TokenizerBundle:
    files: dict[str, bytes] = {}
    for name in TOKENIZER_FILE_NAMES:
        path = model_dir / name
        if path.is_file():
            files[name] = path.read_bytes()
    if not any(n in files for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TokenizerFileError(f"{model_dir} has no tokenizer (tokenizer.json, tokenizer.model "
                                 f"or vocab.json): start the frontend with --tokenizer PATH")
    if sum(map(len, files.values())) > MAX_TOTAL_BYTES:
        raise TokenizerFileError(f"the tokenizer files in {model_dir} exceed "
                                 f"{MAX_TOTAL_BYTES >> 20} MiB: start the frontend with --tokenizer PATH")
    return TokenizerBundle(files)


def check_bundle(bundle: TokenizerBundle) -> None:
    """What a frontend checks before writing a bundle to disk: only known names."""
    unknown = sorted(set(bundle.files) - set(TOKENIZER_FILE_NAMES))
    if unknown:
        raise TokenizerFileError(f"unexpected tokenizer file names {unknown}")


class TokenizerFiles:
    """Reads the engine's tokenizer files once the model has loaded (like KVPort, it
    waits for READY). `ready` is False until then; the worker reports 'loading' meanwhile,
    so a frontend that sees it ready always gets the files."""

    def __init__(self, engine: WorkerEngine):
        self._engine = engine
        self._task: asyncio.Task | None = None
        self.encoded: bytes | None = None     # the JSON body, once read
        self.error: str | None = None         # why there is none

    @property
    def ready(self) -> bool:
        return self._task is not None and self._task.done()

    def start_when_ready(self) -> None:
        self._task = asyncio.create_task(self._read(), name="tokenizer-files")

    async def _read(self) -> None:
        while self._engine.state is EngineState.LOADING:
            await asyncio.sleep(0.05)
        if self._engine.state is not EngineState.READY:
            return
        model_dir = Path(self._engine.info().model_dir)
        try:
            bundle = await asyncio.to_thread(read_tokenizer_files, model_dir)
        except (OSError, TokenizerFileError) as e:
            self.error = f"cannot serve the tokenizer of {model_dir}: {e}"
            logger.warning(self.error)
            return
        self.encoded = msgspec.json.encode(bundle)
        logger.info("serving tokenizer files %s (%d bytes) from %s", ", ".join(sorted(bundle.files)),
                    len(self.encoded), model_dir)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
