"""One log format for every process, tagged with the process's part (worker, frontend,
serve) so the interleaved output of `serve` stays readable."""

from __future__ import annotations

import logging

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(part: str, level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s [{part}] %(name)s: %(message)s",
        force=True)
    # httpx logs every request at INFO: the health polls would drown the useful lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
