"""One request's trip through a worker, as the frontend sees it: token ids come in, text
deltas go out, with incremental detokenization, stop strings and request metrics.

Leaving `deltas()` early (stop string hit, client gone) closes the worker stream, which
aborts the request in the worker and frees its KV blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

from splitserve.frontend.detokenizer import IncrementalDetokenizer
from splitserve.frontend.errors import OpenAIError, bad_request, unavailable
from splitserve.frontend.stop_strings import StopStringMatcher
from splitserve.frontend.worker_client import WorkerClient, WorkerRejected, WorkerUnavailable
from splitserve.metrics import FrontendMetrics
from splitserve.worker import protocol as p

logger = logging.getLogger(__name__)

CLIENT_GONE = "499"  # requests_total status for a client that left before the end


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None


class Generation:
    def __init__(self, client: WorkerClient, tokenizer, metrics: FrontendMetrics,
                 request: p.GenerateRequest, stop: list[str], arrival: float):
        self.request_id = request.request_id
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_generated_tokens = 0
        self._client = client
        self._request = request
        self._metrics = metrics
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(stop)
        self._arrival = arrival
        self._last_token_at: float | None = None
        self._resources = AsyncExitStack()
        self._chunks: AsyncIterator[p.GenerateChunk] | None = None

    async def start(self) -> None:
        """Send the request to a worker; raises OpenAIError (400 refused, 503 no worker)."""
        try:
            url = self._client.pick()
            self._chunks = await self._resources.enter_async_context(self._client.stream(url, self._request))
        except WorkerRejected as e:
            raise bad_request(str(e), e.param) from e
        except WorkerUnavailable as e:
            raise unavailable(str(e)) from e
        self._metrics.prompt_tokens.inc(self.num_prompt_tokens)
        logger.info("request_id=%s sent to %s: %d prompt tokens, max_tokens=%d", self.request_id,
                    url, self.num_prompt_tokens, self._request.sampling.max_tokens)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas; the last one carries the finish reason. Call start() first."""
        status = CLIENT_GONE
        try:
            async for chunk in self._chunks:
                if chunk.error is not None:
                    raise unavailable(f"the worker failed this request: {chunk.error}")
                self._observe_tokens(len(chunk.new_token_ids))
                text = self._stop.feed(self._detok.push(chunk.new_token_ids))
                reason = None
                if chunk.finish_reason is not None:
                    text += self._stop.feed(self._detok.flush()) + self._stop.flush()
                    reason = chunk.finish_reason
                if self._stop.stopped:
                    reason = "stop"
                if text or reason:
                    yield Delta(text, reason)
                if reason is not None:
                    status = "200"
                    return
            raise unavailable("the worker closed the stream before the request finished")
        except WorkerUnavailable as e:
            status = "503"
            raise unavailable(str(e)) from e
        except OpenAIError as e:
            status = str(e.status)
            raise
        finally:
            # NOTE: under cancellation (client gone) the await below may be cancelled too;
            # the outcome is recorded regardless.
            try:
                await self._resources.aclose()
            finally:
                self._finish(status)

    def _observe_tokens(self, n: int) -> None:
        if n == 0:
            return
        now = time.monotonic()
        if self._last_token_at is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
        else:
            self._metrics.inter_token_latency.observe(now - self._last_token_at)
        self._last_token_at = now
        self.num_generated_tokens += n
        self._metrics.generation_tokens.inc(n)

    def _finish(self, status: str) -> None:
        self._metrics.requests.labels(status=status).inc()
        elapsed = time.monotonic() - self._arrival
        if status == "200":
            self._metrics.e2e_request_latency.observe(elapsed)
            logger.info("request_id=%s done: %d tokens in %.3fs", self.request_id,
                        self.num_generated_tokens, elapsed)
        elif status == CLIENT_GONE:
            logger.info("request_id=%s client disconnected after %d tokens; aborted",
                        self.request_id, self.num_generated_tokens)
        else:
            logger.warning("request_id=%s failed (%s) after %d tokens", self.request_id, status,
                           self.num_generated_tokens)
