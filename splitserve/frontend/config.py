"""The frontend's settings; CLI defaults are read from here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.config import option

from splitserve.router import RouterConfig

PREFILL_OVERFLOW = ("local", "queue")
REASONING_PARSERS = ("deepseek_r1", "qwen3")
TOOL_CALL_PARSERS = ("hermes", "llama3_json")   # frontend/tool_parsers/, by vLLM's names


@dataclass(frozen=True)
class FrontendConfig:
    """migration_limit: how many times one request may move to another decode worker after
    its own was lost mid-stream (0: never; the client then gets the error).
    poll_interval_s: how often every known worker's /health is checked.
    max_request_bytes: the largest request body accepted (413 above it). 16 MiB holds a
    prompt of a few million characters, far beyond any context we serve.

    Backpressure (admission.py): a request no worker can take yet waits in a FIFO queue of
    at most max_queued_requests (one more: 429) for at most queue_timeout_s (then 503).
    Like vLLM's waiting queue, but bounded: 600 s is the OpenAI client's own default
    timeout, past which nobody is waiting for the answer any more.

    prefill_overflow: what happens to a request when no prefill worker is ready, or every
    ready one's expected wait (pending prompt tokens / measured rate) exceeds
    max_prefill_wait_s: 'local' sends it to a decode worker without a prefill worker (it
    computes the prompt itself), 'queue' keeps it in the admission queue until a prefill
    worker is usable. max_prefill_wait_s None (the default, as vLLM): a busy prefill worker
    is never saturated; its queue is a queue (the decode worker waits up to its
    --kv-busy-timeout). Computing locally pays only where decode workers have cores to
    spare: on one machine measured TTFT got worse (docs/benchmarks.md).

    api_key: clients must send `Authorization: Bearer <api_key>` (auth.py); None: open.
    reasoning_parser: how chat output is split into reasoning_content and content
    (reasoning.py); None: it is all content.
    tool_call_parser: how the model family writes tool calls (frontend/tool_parsers/);
    enable_auto_tool_choice: tool_choice "auto" (the default with tools) is served, the
    output parsed by that parser; without it "auto" is a 400 (vLLM's flags).
    tokenizer: a directory with the model's tokenizer files and chat template; None: they
    come from a ready worker (tokenizer_source.py), so this host needs no model files."""

    router: RouterConfig = field(default_factory=RouterConfig)
    migration_limit: int = option(3, metavar="N", help=(
        "times a request may move to another decode worker when its own dies mid-stream"))
    poll_interval_s: float = 0.5
    max_request_bytes: int = option(16 * 2**20, metavar="N", help=(
        "largest API request body accepted; a larger one is answered 413"))
    # The deployment's secret: workers that have one require it on their API.
    worker_secret: str | None = field(default=None, repr=False)
    max_queued_requests: int = option(1024, metavar="N", help=(
        "requests that may wait, in arrival order, for a worker to take them; one more is "
        "answered 429"))
    queue_timeout_s: float = option(600.0, flag="--queue-timeout", metavar="SECONDS", help=(
        "how long a request may wait in that queue before it is answered 503"))
    prefill_overflow: str = option("local", choices=PREFILL_OVERFLOW, help=(
        "when no prefill worker is ready, or all expect a wait above --max-prefill-wait: "
        "local (a decode worker computes the prompt itself) or queue (wait for a prefill "
        "worker)"))
    max_prefill_wait_s: float | None = option(None, flag="--max-prefill-wait", type=float,
                                              metavar="SECONDS", help=(
        "a prefill worker whose queued prompt tokens / measured rate exceed this is "
        "saturated (default: never; requests wait in its queue)"))
    # Never on a child's command line (visible to `ps`): serve passes it in the environment.
    api_key: str | None = option(None, type=str, metavar="KEY", child=False, repr=False, help=(
        "clients must send Authorization: Bearer KEY to every route but /live, /health and "
        "/metrics (default: $SPLITSERVE_API_KEY; unset: open)"))
    reasoning_parser: str | None = option(None, choices=REASONING_PARSERS, help=(
        "split chat output into reasoning_content (inside <think>...</think>) and content, "
        "as vLLM's parser of that name (default: off)"))
    tool_call_parser: str | None = option(None, choices=TOOL_CALL_PARSERS, help=(
        "how the model writes tool calls, parsed into tool_calls as vLLM's parser of that "
        "name (default: off)"))
    enable_auto_tool_choice: bool = option(False, help=(
        'serve tool_choice "auto" (the default when tools are given): the model decides, '
        "--tool-call-parser reads its calls"))
    # A local tokenizer directory; None: the workers hand theirs out (GET /tokenizer).
    tokenizer: str | None = option(None, type=str, metavar="DIR", help=(
        "directory with the model's tokenizer and chat template (default: fetched from a "
        "ready worker, so this host needs no model files)"))

    def __post_init__(self) -> None:
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {self.poll_interval_s}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not 0 < self.queue_timeout_s < math.inf:
            raise ValueError(f"queue_timeout_s must be positive and finite, got {self.queue_timeout_s}")
        if self.prefill_overflow not in PREFILL_OVERFLOW:
            raise ValueError(f"prefill_overflow must be one of {PREFILL_OVERFLOW}, got "
                             f"{self.prefill_overflow!r}")
        if self.max_prefill_wait_s is not None and not 0 < self.max_prefill_wait_s < math.inf:
            raise ValueError(f"max_prefill_wait_s must be positive and finite, got "
                             f"{self.max_prefill_wait_s}")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable()
                                         or not self.api_key.isascii()):
            # An HTTP header carries it: printable ASCII. The value is never echoed.
            raise ValueError("api_key must be a non-empty string of printable ASCII characters")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got "
                             f"{self.reasoning_parser!r}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got "
                             f"{self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
