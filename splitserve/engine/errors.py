"""The errors by which an engine refuses a request. They cross the engine's boundary: the
worker maps them to HTTP statuses (400, 503) whichever engine raised them, so they live
apart from any engine's code (worker/engine_api.py imports them without loading one)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot accept; the message says why, `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CapacityError(RuntimeError):
    """The KV pool cannot hold a reservation right now (admission control on decode)."""
