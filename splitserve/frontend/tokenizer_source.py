"""Where the frontend's tokenizer and chat template come from: a local directory
(`--tokenizer PATH`), or else a ready worker's GET /tokenizer, so the frontend's host needs
no copy of the model. The worker's files are written into a temporary directory only for
transformers to load them, then removed (the loaded tokenizer keeps what it needs in
memory)."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

import httpx
import msgspec

from splitserve.frontend.worker_client import WorkerClient
from splitserve.worker.tokenizer_files import TokenizerBundle, TokenizerFileError, check_bundle

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 60.0


class TokenizerUnavailable(Exception):
    """No tokenizer can be had: a worker said why (its model ships none), or the
    --tokenizer directory does not load. Retrying does not help."""


def _from_pretrained(path: str):
    from transformers import AutoTokenizer  # slow import: keep /live fast at start-up
    return AutoTokenizer.from_pretrained(path)


def _from_bundle(bundle: TokenizerBundle):
    check_bundle(bundle)
    with tempfile.TemporaryDirectory(prefix="splitserve-tokenizer-") as tmp:
        for name, data in bundle.files.items():
            (Path(tmp) / name).write_bytes(data)
        return _from_pretrained(tmp)


async def load_tokenizer(path: str | None, client: WorkerClient, retry_interval_s: float):
    """The tokenizer, from `path` or else from the ready workers, tried in turn until one
    answers (a worker that just died or restarted is skipped, and tried again later)."""
    if path is not None:
        try:
            return await asyncio.to_thread(_from_pretrained, path)
        except Exception as e:
            raise TokenizerUnavailable(f"cannot load the tokenizer from --tokenizer {path}: {e}") from e
    while True:
        for worker in [w for w in client.workers() if w.ready]:
            try:
                resp = await client.http.get(f"{worker.url}/tokenizer", timeout=FETCH_TIMEOUT_S)
            except httpx.HTTPError as e:
                logger.warning("cannot fetch the tokenizer from worker %s: %r; trying another",
                               worker.worker_id, e)
                continue
            if resp.status_code == 404:
                raise TokenizerUnavailable(f"worker {worker.worker_id} serves no tokenizer: "
                                           f"{resp.json().get('reason')}")
            if resp.status_code != 200:
                logger.warning("worker %s answered GET /tokenizer with %d; trying another",
                               worker.worker_id, resp.status_code)
                continue
            try:
                bundle = msgspec.json.decode(resp.content, type=TokenizerBundle)
                tok = await asyncio.to_thread(_from_bundle, bundle)
            except (msgspec.ValidationError, msgspec.DecodeError, TokenizerFileError) as e:
                raise TokenizerUnavailable(f"worker {worker.worker_id} sent an unusable "
                                           f"tokenizer: {e}") from e
            except Exception as e:
                raise TokenizerUnavailable(f"cannot load the tokenizer of worker "
                                           f"{worker.worker_id}: {e}") from e
            logger.info("tokenizer loaded from worker %s (%s)", worker.worker_id,
                        ", ".join(sorted(bundle.files)))
            return tok
        await asyncio.sleep(retry_interval_s)
