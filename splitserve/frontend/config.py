"""The frontend's settings; CLI defaults are read from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.router import RouterConfig


@dataclass(frozen=True)
class FrontendConfig:
    """migration_limit: how many times one request may move to another decode worker after
    its own was lost mid-stream (0: never; the client then gets the error).
    poll_interval_s: how often every known worker's /health is checked.
    max_request_bytes: the largest request body accepted (413 above it). 16 MiB holds a
    prompt of a few million characters, far beyond any context we serve."""

    router: RouterConfig = field(default_factory=RouterConfig)
    migration_limit: int = 3
    poll_interval_s: float = 0.5
    max_request_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {self.poll_interval_s}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
