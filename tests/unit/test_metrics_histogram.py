"""common.metrics.histogram: Prometheus bucket semantics (le is inclusive, cumulative)."""

from __future__ import annotations

import pytest

from common.metrics.histogram import LatencyHistogram


def test_buckets_are_cumulative_with_inclusive_upper_bounds() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    durations_ns = (1, 1_000_000, 1_000_001, 10_000_000, 10_000_001, 5_000_000_000)
    for ns in durations_ns:
        histogram.observe_ns(ns)
    assert histogram.buckets() == [("0.001", 2), ("0.01", 4), ("+Inf", 6)]
    assert histogram.count == len(durations_ns)
    assert histogram.sum_s == pytest.approx(sum(durations_ns) / 1e9)


@pytest.mark.parametrize("bounds", [(), (0.0, 1.0), (1.0, 0.5), (0.1, 0.1)])
def test_bounds_must_be_positive_and_increasing(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="positive and increasing"):
        LatencyHistogram(bounds)
