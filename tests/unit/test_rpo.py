"""primaryd.rpo: over the RPO target once, back under once (hysteresis), the inflow delay."""

from __future__ import annotations

import pytest

from primaryd.rpo import (
    CLEAR_FRACTION,
    CLEAR_HOLD_S,
    DELAY_MAX_S,
    DELAY_MIN_S,
    RpoChange,
    RpoWatch,
)

TARGET_S = 2.0
TICK_S = 0.1


def run(watch: RpoWatch, lags: list[float], start: float = 0.0) -> list[tuple[float, RpoChange]]:
    """Feed one lag per tick; the changes with the time they came."""
    changes = []
    for n, lag in enumerate(lags):
        now = start + n * TICK_S
        change = watch.update(lag, now)
        if change is not None:
            changes.append((round(now, 3), change))
    return changes


def test_under_the_target_nothing_happens() -> None:
    watch = RpoWatch(TARGET_S)
    assert run(watch, [0.0, 1.0, TARGET_S, 0.5]) == []
    assert not watch.over


def test_over_once_then_back_under_after_the_hold() -> None:
    watch = RpoWatch(TARGET_S)
    hold_ticks = round(CLEAR_HOLD_S / TICK_S)
    lags = [1.0, 2.5, 3.0, 4.0, 3.0, 0.5] + [0.5] * hold_ticks
    changes = run(watch, lags)
    assert [c for _, c in changes] == [RpoChange.EXCEEDED, RpoChange.RECOVERED]
    assert changes[0][0] == 0.1
    assert changes[1][0] == pytest.approx((5 + hold_ticks) * TICK_S)
    assert watch.peak_lag_s == 4.0
    assert watch.over_since == 0.1


def test_hovering_around_the_target_does_not_flap() -> None:
    """Between 80% and 100% of the target the watch stays over; a dip under the band
    shorter than the hold does not count."""
    watch = RpoWatch(TARGET_S)
    band = TARGET_S * CLEAR_FRACTION
    short_dip = round(CLEAR_HOLD_S / TICK_S) - 2
    lags = [TARGET_S + 0.1, band + 0.1, TARGET_S + 0.1, band + 0.05] * 5
    lags += [band - 0.1] * short_dip + [TARGET_S + 0.2]
    assert [c for _, c in run(watch, lags)] == [RpoChange.EXCEEDED]
    assert watch.over


def test_reset_forgets_a_breach_and_the_next_one_is_told() -> None:
    watch = RpoWatch(TARGET_S)
    assert run(watch, [3.0]) == [(0.0, RpoChange.EXCEEDED)]
    watch.reset()
    assert not watch.over and watch.peak_lag_s == 0.0
    assert run(watch, [3.5], start=5.0) == [(5.0, RpoChange.EXCEEDED)]


@pytest.mark.parametrize(
    ("lag_s", "delay_s"),
    [
        (0.0, 0.0),
        (TARGET_S, 0.0),
        (TARGET_S * 1.5, DELAY_MIN_S + (DELAY_MAX_S - DELAY_MIN_S) / 2),
        (TARGET_S * 2, DELAY_MAX_S),
        (TARGET_S * 100, DELAY_MAX_S),
    ],
)
def test_inflow_delay_grows_with_the_overshoot_and_is_bounded(lag_s: float, delay_s: float) -> None:
    assert RpoWatch(TARGET_S, inflow_control=True).ack_delay_s(lag_s) == pytest.approx(delay_s)


def test_no_delay_without_inflow_control() -> None:
    assert RpoWatch(TARGET_S).ack_delay_s(TARGET_S * 10) == 0.0


def test_just_over_the_target_delays_a_little() -> None:
    delay = RpoWatch(TARGET_S, inflow_control=True).ack_delay_s(TARGET_S + 1e-6)
    assert DELAY_MIN_S <= delay < DELAY_MIN_S * 1.01
