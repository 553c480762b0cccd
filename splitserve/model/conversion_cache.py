"""Convert a GGUF file once and share the result between processes.

A converted checkpoint lives at <root>/<gguf stem>-<hash of size and mtime>/; a changed
GGUF file gets a new directory. Invariant: that directory exists only complete, because
it only ever appears by os.rename of a finished temporary sibling (atomic on one file
system). An flock serializes converters so concurrent workers convert once and the others
wait; should locking be unavailable (some network file systems), the rename still makes
racing processes safe: the loser finds a complete directory and drops its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

MARKER = "splitserve-conversion.json"  # written last into the temporary dir

Converter = Callable[[Path, Path], None]  # (gguf file, empty output dir)


def converted_dir(gguf: Path, root: Path, convert: Converter) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    final = root / f"{gguf.stem}-{key}"
    if _complete(final):
        logger.info("using converted checkpoint %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{final.name}.lock") as locked:
        if _complete(final):  # another process converted it while we waited
            logger.info("using checkpoint %s converted by another process", final)
            return final
        if locked:  # without the lock, a "leftover" may be a live converter's work
            _clean_leftovers(root, final)
        logger.info("converting %s once into %s", gguf, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps(
                {"source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "converted_at": time.time()}))
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already if published
    return final


def _complete(d: Path) -> bool:
    return (d / MARKER).is_file()


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        # Renaming onto a non-empty directory fails: someone else published first.
        if not _complete(final):
            raise


def _clean_leftovers(root: Path, final: Path) -> None:
    """Temporary dirs of converters that died, and a final dir without its marker (which
    only manual tampering can produce). Safe: we hold the lock, nobody is converting."""
    for stale in root.glob(f".{final.name}.tmp-*"):
        logger.info("removing leftover of an interrupted conversion: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        logger.warning("removing incomplete converted checkpoint %s", final)
        shutil.rmtree(final)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Yields whether the lock is held; closing the file releases it."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            logger.warning("cannot lock %s (%s); relying on atomic rename alone", lock_path, e)
            yield False
        else:
            yield True
