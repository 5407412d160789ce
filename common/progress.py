"""A copy's rate and time left, from a short history of (time, bytes done) samples.

    update(done, now) ── a sample at most every SAMPLE_EVERY_S, SAMPLES_MAX kept (a ring)
                         done went down: a new pass began, the history restarts
    rate_bytes_per_s(now) = (done - oldest sample's done) / (now - oldest sample's time)
    eta_s(total, now)     = (total - done) / rate

The rate is measured up to `now`, not up to the last sample: a copy that stalls (waiting for
journal space, a slow link) shows its rate falling and its ETA growing, instead of the last
good figure forever. No clock is read here: the caller passes `now` (time.monotonic()).
"""

from __future__ import annotations

from collections import deque

__all__ = ["RateMeter"]

SAMPLE_EVERY_S = 0.5
SAMPLES_MAX = 60  # with SAMPLE_EVERY_S: the rate is the average over the last 30 s or so
MEASURED_MIN_S = 1.0  # a rate over less time than this is noise: none yet


class RateMeter:
    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=SAMPLES_MAX)
        self._done = 0

    def update(self, done_bytes: int, now_s: float) -> None:
        if done_bytes < self._done:
            self._samples.clear()
        self._done = done_bytes
        if not self._samples or now_s - self._samples[-1][0] >= SAMPLE_EVERY_S:
            self._samples.append((now_s, done_bytes))

    def rate_bytes_per_s(self, now_s: float) -> float | None:
        """Bytes a second over the history, or None before MEASURED_MIN_S of it."""
        if not self._samples:
            return None
        first_s, first_done = self._samples[0]
        elapsed_s = now_s - first_s
        if elapsed_s < MEASURED_MIN_S:
            return None
        return (self._done - first_done) / elapsed_s

    def eta_s(self, total_bytes: int, now_s: float) -> float | None:
        """Seconds until `total_bytes` at the current rate; None while it is unknown or 0."""
        rate = self.rate_bytes_per_s(now_s)
        if rate is None or rate <= 0:
            return None
        return max(0, total_bytes - self._done) / rate
