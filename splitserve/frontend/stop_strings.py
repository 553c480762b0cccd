"""Stop strings over streamed text.

The engine knows only token ids, so stop strings are matched here, on the detokenized
text. A stop string may span several deltas (and tokens), so any tail of the text that
could be the start of a stop string is held back until it either completes one (the text
ends just before it) or stops matching (the tail is released).
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]):
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the part of `text` (plus held-back text) that is safe to emit. After a
        stop string is found, `stopped` is True and nothing from it on is ever returned."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[:min(hits)]
        hold = self._longest_partial_suffix(buf)
        self._pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """The stream ended without a stop string: release the held-back tail."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending

    def _longest_partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
