"""A latency histogram cheap enough for a per-request hot path.

prometheus_client's Histogram takes a lock and walks its buckets in Python on every
observe(); an NBD request is answered in tens of microseconds, so that would be a few
percent of it. This one is a list of plain counters found by bisect (one C call), with no
lock: each histogram has one writer at a time (the event loop, or the one executor thread
that runs a journal's fdatasync), and a scrape that reads it meanwhile sees each counter
either before or after an increment, which Prometheus's rate() does not mind. The collector
turns it into a prometheus_client HistogramMetricFamily at scrape time (buckets()).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["LATENCY_BOUNDS_S", "LatencyHistogram"]

# Upper bounds (inclusive, as Prometheus's `le`), seconds: from a page-cache 4 KiB write
# (tens of microseconds) to a stalled disk (seconds).
LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_NS_PER_S = 1_000_000_000


class LatencyHistogram:
    """Counts of durations (nanoseconds in, seconds out) per bucket, and their sum."""

    __slots__ = ("_bounds_ns", "bounds_s", "counts", "sum_ns")

    def __init__(self, bounds_s: Sequence[float] = LATENCY_BOUNDS_S) -> None:
        if list(bounds_s) != sorted(set(bounds_s)) or not bounds_s or bounds_s[0] <= 0:
            raise ValueError(f"bucket bounds must be positive and increasing: {bounds_s}")
        self.bounds_s = tuple(bounds_s)
        self._bounds_ns = tuple(round(b * _NS_PER_S) for b in bounds_s)
        self.counts = [0] * (len(bounds_s) + 1)  # the last one: over every bound (+Inf)
        self.sum_ns = 0

    def observe_ns(self, duration_ns: int, times: int = 1) -> None:
        """``times`` observations of ``duration_ns`` (a batch answered together)."""
        self.counts[bisect_left(self._bounds_ns, duration_ns)] += times
        self.sum_ns += duration_ns * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def sum_s(self) -> float:
        return self.sum_ns / _NS_PER_S

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs ending with +Inf, as HistogramMetricFamily wants."""
        total = 0
        cumulative: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds_s, float("inf")), self.counts, strict=True):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return cumulative
