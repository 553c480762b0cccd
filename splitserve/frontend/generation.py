"""One request's trip through the workers, as the frontend sees it: the route planner
names the workers to try, token ids come in, text deltas go out, with incremental
detokenization, stop strings and request metrics.

A worker that cannot take the request (full, unreachable, not ready) is skipped for the
next one the planner named. That is safe only before the worker produced anything: a
decode worker answers its HTTP status once the prompt's KV is in place, so every
transfer-time failure is still a status, and nothing reached the client yet. When none
can take it now, the request waits its turn in the admission queue (admission.py) and
is routed afresh each time it tries again; only a cluster with no worker registered at
all answers 503 at once.

A worker lost after tokens flowed (its stream broke, or ended without a finish reason)
is replaced by *migration*: the request is re-sent, routed afresh, as prompt + every
token generated so far, with max_tokens (and min_tokens) reduced by that many and the same
sampling, the tokens counted as output by penalties (resumed_output_tokens). The
detokenizer, stop strings and counts live here, not in the worker, so the client sees
one uninterrupted stream and usage counts the original prompt and all generated tokens.
Greedy output is identical to an undisturbed run, and so is a seeded sampled one (each
token's randomness comes from the seed and its position, see engine/sampler.py).

Leaving `deltas()` early (stop string hit, client gone) closes the worker stream, which
aborts the request in the worker and frees its KV blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import anyio
import msgspec

from splitserve.engine.types import TokenLogprobs
from splitserve.frontend.admission import AdmissionQueue
from splitserve.frontend.detokenizer import IncrementalDetokenizer
from splitserve.frontend.errors import OpenAIError, bad_gateway, bad_request, unavailable
from splitserve.frontend.routing import Attempt, RoutePlanner
from splitserve.frontend.stop_strings import StopStringMatcher
from splitserve.frontend.worker_client import (KVTransferFailed, WorkerClient, WorkerLost,
                                               WorkerRejected, WorkerUnavailable)
from splitserve.metrics import FrontendMetrics
from splitserve.worker import protocol as p

logger = logging.getLogger(__name__)

CLIENT_GONE = "499"  # requests_total status for a client that left before the end


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None
    # The logprobs of the tokens that arrived with this delta (its text may lag them:
    # partial characters and possible stop strings are held back).
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class Generation:
    def __init__(self, client: WorkerClient, planner: RoutePlanner, tokenizer,
                 metrics: FrontendMetrics, request: p.GenerateRequest, stop: list[str],
                 arrival: float, migration_limit: int = 3, *,
                 admission: AdmissionQueue | None = None):
        """admission: the frontend's queue; None: a request no worker takes at once is
        answered 503 with every worker's refusal."""
        self.request_id = request.request_id
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_generated_tokens = 0
        self.num_migrations = 0
        self._generated: list[int] = []
        self._num_transferred_tokens = 0
        self._client = client
        self._planner = planner
        self._attempt: Attempt | None = None
        self._request = request
        self._migration_limit = migration_limit
        self._admission = admission
        self._metrics = metrics
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(stop)
        self._arrival = arrival
        self._last_token_at: float | None = None
        self._resources = AsyncExitStack()
        self._chunks: AsyncIterator[p.GenerateChunk] | None = None
        # The first chunk, read ahead by first_token_seen(); or why reading it failed.
        self._peeked: p.GenerateChunk | None = None
        self._peek_error: Exception | None = None
        # A sibling choice (n > 1) tries the worker that computed choice 0's prompt first.
        self._share_from: Attempt | None = None

    def share_prompt_of(self, first: "Generation") -> None:
        """Try `first`'s worker before routing: it holds the prompt's KV in its prefix
        cache, so this choice computes only the prompt's last, partial block there, with
        no prefill of its own and no KV transfer."""
        self._share_from = first._attempt

    async def first_token_seen(self) -> None:
        """Read ahead until the first chunk: once it is out, the worker has the whole
        prompt's KV (computed or transferred) in its prefix cache. A failure is kept for
        deltas(), where it takes the migration path as any broken stream does."""
        try:
            self._peeked = await anext(self._chunks)
        except StopAsyncIteration:
            self._peek_error = WorkerLost(f"worker {self._attempt.url} closed the stream before "
                                          "the first token")
        except Exception as e:     # noqa: BLE001 -- re-raised in order by deltas()
            self._peek_error = e

    async def start(self) -> None:
        """Hand the request to the first worker that takes it, waiting in the admission
        queue while none can; raises OpenAIError (400 invalid, 429 the queue is full, 502
        the KV transfer failed, 503 no worker took it within the queue's wait limit)."""
        await self._send(self._request)
        self._metrics.prompt_tokens.inc(self.num_prompt_tokens)

    async def _send(self, request: p.GenerateRequest) -> None:
        if self._admission is None:
            if (refusal := await self._try(request)) is not None:
                raise unavailable(f"no worker could take the request: {refusal}")
            return
        await self._admission.admit(
            self.request_id, lambda: self._try(request),
            lambda: self._planner.fits(request, self._client.workers()))

    async def _try(self, request: p.GenerateRequest) -> str | None:
        """One round of attempts, routed afresh: None when a worker took the request,
        else why none could now. Raises OpenAIError when waiting cannot help (no worker
        registered, the prompt can never fit, the request is invalid, the KV transfer
        failed)."""
        workers = self._client.workers()
        if not workers:
            self._metrics.requests_rejected.labels(reason="no_worker").inc()
            logger.warning("request_id=%s: no worker is registered in discovery", self.request_id)
            raise unavailable("no worker can serve the request: no worker is registered in discovery")
        route = self._planner.route(request, workers)
        if not route.attempts:
            return route.reason
        if (too_big := self._planner.oversized(request, route, workers)) is not None:
            raise bad_request(f"the request can never be served by this deployment: {too_big}")
        attempts = route.attempts
        share = self._share_from
        if share is not None and request is self._request and any(w.url == share.url and w.ready
                                                                     for w in workers):
            # Its prompt's blocks are cached there; compute_tokens: only the partial tail.
            attempts = [Attempt(share.url, share.worker_id, None, share.worker_id, 0), *attempts]
        failures: list[str] = []
        for attempt in attempts:
            sent = msgspec.structs.replace(request, prefill=attempt.prefill)
            self._planner.trying(self.request_id, attempt, len(request.prompt_token_ids))
            try:
                self._chunks = await self._resources.enter_async_context(
                    self._client.stream(attempt.url, sent))
            except BaseException as e:
                self._planner.refused(self.request_id)
                if not isinstance(e, WorkerUnavailable):
                    self._raise_refusal(attempt, e)
                logger.warning("request_id=%s not taken: %s", self.request_id, e)
                failures.append(str(e))
                continue
            self._attempt = attempt
            self._planner.sent(self.request_id, attempt)
            via = "" if attempt.prefill is None else f" (KV from prefill worker {attempt.prefill.worker_id})"
            if share is not None and attempt.url == share.url and attempt.prefill is None:
                via = " (prompt KV shared with choice 0 there)"
            if attempt.local_prefill is not None:
                via = f" (prompt computed there: local prefill, {attempt.local_prefill})"
            logger.info("request_id=%s sent to %s%s: %d prompt tokens, max_tokens=%d",
                        self.request_id, attempt.url, via, len(request.prompt_token_ids),
                        request.sampling.max_tokens)
            return None
        return "; ".join(failures)

    def _raise_refusal(self, attempt: Attempt, e: BaseException) -> None:
        """Re-raise what a worker's refusal means for the client (waiting cannot help)."""
        if isinstance(e, WorkerRejected):
            raise bad_request(str(e), e.param) from e
        if isinstance(e, KVTransferFailed):
            logger.warning("request_id=%s KV transfer failed at %s: %s", self.request_id,
                           attempt.url, e)
            raise bad_gateway(f"the prompt's KV cache could not be transferred: {e}") from e
        raise e

    async def abandon(self, why: str) -> None:
        """End a started generation whose deltas() will never run (a sibling choice of an
        n > 1 request could not start, or the client left): its worker stream closes (the
        worker aborts the request, freeing its KV). The HTTP request's outcome is
        recorded by whoever answers it, not here."""
        try:
            await self._close_stream()
        finally:
            self._planner.finished(self.request_id)
            logger.info("request_id=%s abandoned before its first token: %s", self.request_id, why)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas; the last one carries the finish reason. Call start() first."""
        status = CLIENT_GONE
        try:
            while True:
                try:
                    async for delta in self._stream():
                        yield delta
                        if delta.finish_reason is not None:
                            status = "200"
                            return
                    raise WorkerLost(f"worker {self._attempt.url} closed the stream before the "
                                     "request finished")
                except WorkerLost as e:
                    if (delta := await self._migrate(e)) is not None:
                        yield delta
                        status = "200"
                        return
        except OpenAIError as e:
            status = str(e.status)
            raise
        finally:
            try:
                await self._close_stream()
            finally:
                self._finish(status)

    async def _close_stream(self) -> None:
        """Close the worker stream, which makes the worker abort an unfinished request.
        Shielded: when the client leaves, the server cancels this task's scope, and anyio
        cancellation recurs at every await inside it; an unshielded close would be cut
        short and leave the connection open, so the worker would generate to max_tokens."""
        with anyio.CancelScope(shield=True):
            await self._resources.aclose()

    async def _chunks_in_order(self) -> AsyncIterator[p.GenerateChunk]:
        if self._peek_error is not None:
            error, self._peek_error = self._peek_error, None
            raise error
        if self._peeked is not None:
            chunk, self._peeked = self._peeked, None
            yield chunk
        async for chunk in self._chunks:
            yield chunk

    async def _stream(self) -> AsyncIterator[Delta]:
        """The deltas of the current worker's stream; ends early only at a finish."""
        async for chunk in self._chunks_in_order():
            if chunk.error is not None:
                raise unavailable(f"the worker failed this request: {chunk.error}")
            self._observe_tokens(chunk.new_token_ids)
            text = self._stop.feed(self._detok.push(chunk.new_token_ids))
            reason = None
            if chunk.finish_reason is not None:
                text += self._stop.feed(self._detok.flush()) + self._stop.flush()
                reason = chunk.finish_reason
                self._num_transferred_tokens = chunk.num_transferred_tokens
            if self._stop.stopped:
                reason = "stop"
            if text or reason or chunk.logprobs:
                yield Delta(text, reason, chunk.logprobs or [])
            if reason is not None:
                return

    async def _migrate(self, lost: WorkerLost) -> Delta | None:
        """Continue on another worker after `lost`; returns the final delta when nothing
        is left to generate (the worker died after the last token, before saying so)."""
        try:
            await self._close_stream()      # the broken stream
        except WorkerUnavailable:
            pass    # closing a dead connection failed too: nothing left to release
        self._resources = AsyncExitStack()
        self._planner.finished(self.request_id)
        remaining = self._request.sampling.max_tokens - len(self._generated)
        if remaining <= 0:
            logger.info("request_id=%s: %s after its last token; finished", self.request_id, lost)
            text = self._stop.feed(self._detok.flush()) + self._stop.flush()
            return Delta(text, "stop" if self._stop.stopped else "length")
        if self.num_migrations >= self._migration_limit:
            logger.warning("request_id=%s: %s; migration limit (%d) reached", self.request_id,
                           lost, self._migration_limit)
            raise unavailable(f"the request's worker was lost and it was already migrated "
                              f"{self.num_migrations} times (the limit): {lost}")
        self.num_migrations += 1
        self._metrics.requests_migrated.inc()
        logger.warning("request_id=%s: %s; migrating after %d tokens (migration %d of at most "
                       "%d)", self.request_id, lost, len(self._generated), self.num_migrations,
                       self._migration_limit)
        # A fresh worker-side id that still starts with the request's: the prefill worker
        # may hold the old id's KV lease a while after the lost decode worker died.
        request = msgspec.structs.replace(
            self._request, request_id=f"{self.request_id}-m{self.num_migrations}",
            prompt_token_ids=self._request.prompt_token_ids + self._generated,
            sampling=msgspec.structs.replace(
                self._request.sampling, max_tokens=remaining,
                min_tokens=max(self._request.sampling.min_tokens - len(self._generated), 0),
                resumed_output_tokens=self._request.sampling.resumed_output_tokens + len(self._generated)))
        await self._send(request)
        return None

    def _observe_tokens(self, token_ids: list[int]) -> None:
        if not token_ids:
            return
        now = time.monotonic()
        if self._last_token_at is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
            self._planner.first_token(self.request_id)
        else:
            self._metrics.inter_token_latency.observe(now - self._last_token_at)
        self._last_token_at = now
        self._generated.extend(token_ids)
        self.num_generated_tokens += len(token_ids)
        self._metrics.generation_tokens.inc(len(token_ids))

    def _finish(self, status: str) -> None:
        self._planner.finished(self.request_id)
        self._metrics.requests.labels(status=status).inc()
        elapsed = time.monotonic() - self._arrival
        if status == "200":
            self._metrics.e2e_request_latency.observe(elapsed)
            # Transferred vs prompt tokens tells an operator whether the KV hand-off worked
            # or the decode worker recomputed the prompt.
            kv = "" if self._attempt.prefill is None else \
                f", KV of {self._num_transferred_tokens}/{self.num_prompt_tokens} prompt tokens transferred"
            if self._attempt.local_prefill is not None:
                kv = f", prompt computed on the decode worker ({self._attempt.local_prefill})"
            moved = f", migrated {self.num_migrations} time(s)" if self.num_migrations else ""
            logger.info("request_id=%s done: %d tokens in %.3fs%s%s", self.request_id,
                        self.num_generated_tokens, elapsed, kv, moved)
        elif status == CLIENT_GONE:
            logger.info("request_id=%s client disconnected after %d tokens; aborted",
                        self.request_id, self.num_generated_tokens)
        else:
            logger.warning("request_id=%s failed (%s) after %d tokens", self.request_id, status,
                           self.num_generated_tokens)
