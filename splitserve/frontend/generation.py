"""One request's trip through the workers, as the frontend sees it: the route planner
names the workers to try, token ids come in, text deltas go out, with incremental
detokenization, stop strings and request metrics.

A worker that cannot take the request (full, unreachable, not ready) is skipped for the
next one the planner named. That is safe only before the worker produced anything: a
decode worker answers its HTTP status once the prompt's KV is in place, so every
transfer-time failure is still a status, and nothing reached the client yet.

Leaving `deltas()` early (stop string hit, client gone) closes the worker stream, which
aborts the request in the worker and frees its KV blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import msgspec

from splitserve.frontend.detokenizer import IncrementalDetokenizer
from splitserve.frontend.errors import OpenAIError, bad_gateway, bad_request, unavailable
from splitserve.frontend.routing import Attempt, RoutePlanner, unavailable_reason
from splitserve.frontend.stop_strings import StopStringMatcher
from splitserve.frontend.worker_client import (KVTransferFailed, WorkerClient, WorkerRejected,
                                               WorkerUnavailable)
from splitserve.metrics import FrontendMetrics
from splitserve.worker import protocol as p

logger = logging.getLogger(__name__)

CLIENT_GONE = "499"  # requests_total status for a client that left before the end


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None


class Generation:
    def __init__(self, client: WorkerClient, planner: RoutePlanner, tokenizer,
                 metrics: FrontendMetrics, request: p.GenerateRequest, stop: list[str],
                 arrival: float):
        self.request_id = request.request_id
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_generated_tokens = 0
        self._num_transferred_tokens = 0
        self._client = client
        self._planner = planner
        self._attempt: Attempt | None = None
        self._request = request
        self._metrics = metrics
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(stop)
        self._arrival = arrival
        self._last_token_at: float | None = None
        self._resources = AsyncExitStack()
        self._chunks: AsyncIterator[p.GenerateChunk] | None = None

    async def start(self) -> None:
        """Hand the request to the first worker that takes it; raises OpenAIError (400
        invalid, 502 the KV transfer failed, 503 no worker could take it)."""
        workers = self._client.workers()
        attempts = self._planner.route(self._request, workers)
        if not attempts:
            reason = unavailable_reason(workers) or "the route planner named no worker"
            logger.warning("request_id=%s: no worker can serve it: %s", self.request_id, reason)
            raise unavailable(f"no worker can serve the request: {reason}")
        failures: list[str] = []
        for attempt in attempts:
            request = msgspec.structs.replace(self._request, prefill=attempt.prefill)
            try:
                self._chunks = await self._resources.enter_async_context(
                    self._client.stream(attempt.url, request))
            except WorkerUnavailable as e:
                logger.warning("request_id=%s not taken: %s", self.request_id, e)
                failures.append(str(e))
                continue
            except WorkerRejected as e:
                raise bad_request(str(e), e.param) from e
            except KVTransferFailed as e:
                logger.warning("request_id=%s KV transfer failed at %s: %s", self.request_id,
                               attempt.url, e)
                raise bad_gateway(f"the prompt's KV cache could not be transferred: {e}") from e
            self._attempt = attempt
            self._metrics.prompt_tokens.inc(self.num_prompt_tokens)
            via = "" if attempt.prefill is None else f" (KV from prefill worker {attempt.prefill.worker_id})"
            logger.info("request_id=%s sent to %s%s: %d prompt tokens, max_tokens=%d",
                        self.request_id, attempt.url, via, self.num_prompt_tokens,
                        self._request.sampling.max_tokens)
            return
        raise unavailable(f"no worker could take the request: {'; '.join(failures)}")

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
                    self._num_transferred_tokens = chunk.num_transferred_tokens
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
            # Transferred vs prompt tokens tells an operator whether the KV hand-off worked
            # or the decode worker recomputed the prompt.
            kv = "" if self._attempt.prefill is None else \
                f", KV of {self._num_transferred_tokens}/{self.num_prompt_tokens} prompt tokens transferred"
            logger.info("request_id=%s done: %d tokens in %.3fs%s", self.request_id,
                        self.num_generated_tokens, elapsed, kv)
        elif status == CLIENT_GONE:
            logger.info("request_id=%s client disconnected after %d tokens; aborted",
                        self.request_id, self.num_generated_tokens)
        else:
            logger.warning("request_id=%s failed (%s) after %d tokens", self.request_id, status,
                           self.num_generated_tokens)
