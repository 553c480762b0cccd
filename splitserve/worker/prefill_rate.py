"""How fast this worker computes prompts, measured from its engine's counters over time.

Routers divide a prefill worker's pending prompt tokens by this rate to estimate the wait
a new prompt can expect there (the frontend's `--max-prefill-wait`). It must measure
capacity, not demand: an idle worker computes 0 tokens/s and is not slow. So only
intervals that began with prefill work pending count, and the rate is a decaying average
of tokens over busy time (a time constant of `tau_s`), which smooths over engine steps
that land on either side of a sample. Until one busy interval was seen the rate is 0:
unknown, and routers then treat the worker as not saturated.
"""

from __future__ import annotations

import math


class PrefillRateMeter:
    def __init__(self, tau_s: float = 10.0):
        self.tau_s = tau_s
        self._last: tuple[float, int, int] | None = None    # (time, computed tokens, pending)
        self._tokens = 0.0      # decayed sums over busy intervals
        self._seconds = 0.0

    def observe(self, now: float, computed_prompt_tokens: int, pending_prompt_tokens: int) -> float:
        """Take one sample (monotonic time, the engine's cumulative computed prompt tokens,
        its pending prompt tokens now); returns the rate in tokens/s (0: unknown)."""
        last, self._last = self._last, (now, computed_prompt_tokens, pending_prompt_tokens)
        if last is not None:
            dt, done = now - last[0], computed_prompt_tokens - last[1]
            # NOTE: a counter that went backwards is a restarted engine: start over.
            if done < 0:
                self._tokens = self._seconds = 0.0
            elif dt > 0 and last[2] > 0:
                keep = math.exp(-dt / self.tau_s)
                self._tokens = self._tokens * keep + done
                self._seconds = self._seconds * keep + dt
        return self.rate

    @property
    def rate(self) -> float:
        return self._tokens / self._seconds if self._seconds > 0 and self._tokens > 0 else 0.0
