"""The RPO target of a group (pair.rpo_target_s) and HUR-style inflow control. No I/O, no clock:
the primary's watch loop passes the lag and the time in (every WATCH_S, in PAIR and PFUL).

    lag_s ─► RpoWatch.update(lag_s, now)
               under ── lag_s > target ────────────────────────────────► over: "exceeded"
               over  ── lag_s <= target x CLEAR_FRACTION for CLEAR_HOLD_S ─► under: "recovered"
             RpoWatch.ack_delay_s(lag_s)       (pair.inflow_control only)
               0 at or under the target; over it DELAY_MIN_S, growing linearly with the
               overshoot to DELAY_MAX_S at twice the target

The band (80% of the target) and the hold (1 s) are the hysteresis: a lag hovering around the
target gives one "exceeded" and one "recovered", not one pair per watch tick.

Inflow control trades host write latency for RPO: over the target each host write (WRITE,
TRIM, WRITE_ZEROES without FUA) is acknowledged up to DELAY_MAX_S later, so a host that waits
for its writes (every real one has a bounded queue depth) writes slower and the secondary
catches up. It never fails a write and never blocks the event loop (an awaited sleep before
the reply, common.nbd.server); a host with a deep queue is slowed less than one writing QD1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["CLEAR_FRACTION", "CLEAR_HOLD_S", "DELAY_MAX_S", "DELAY_MIN_S", "RpoChange", "RpoWatch"]

CLEAR_FRACTION = 0.8  # back under the target: the lag at most this fraction of it...
CLEAR_HOLD_S = 1.0  # ...for this long
DELAY_MIN_S = 0.0005  # a write reply's delay just over the target
DELAY_MAX_S = 0.005  # at twice the target and beyond


class RpoChange(enum.Enum):
    EXCEEDED = "rpo_exceeded"  # the event kinds (common.events.notice)
    RECOVERED = "rpo_recovered"


@dataclass(slots=True)
class RpoWatch:
    target_s: float
    inflow_control: bool = False
    over: bool = False
    over_since: float = 0.0  # when the lag went over the target
    peak_lag_s: float = 0.0  # the highest lag while over
    _under_since: float | None = None  # back under the band since (while over)

    def update(self, lag_s: float, now: float) -> RpoChange | None:
        """The lag now; returns the change the operator is told about, if any."""
        if not self.over:
            if lag_s <= self.target_s:
                return None
            self.over, self.over_since, self.peak_lag_s = True, now, lag_s
            self._under_since = None
            return RpoChange.EXCEEDED
        self.peak_lag_s = max(self.peak_lag_s, lag_s)
        if lag_s > self.target_s * CLEAR_FRACTION:
            self._under_since = None
            return None
        if self._under_since is None:
            self._under_since = now
        if now - self._under_since < CLEAR_HOLD_S:
            return None
        self.over = False
        return RpoChange.RECOVERED

    def reset(self) -> None:
        """The pair left PAIR/PFUL (a suspension, a split): the lag means nothing there."""
        self.over, self.peak_lag_s, self._under_since = False, 0.0, None

    def ack_delay_s(self, lag_s: float) -> float:
        """How long to hold a host write's reply at this lag (0 without inflow control)."""
        if not self.inflow_control or lag_s <= self.target_s:
            return 0.0
        overshoot = min(1.0, (lag_s - self.target_s) / self.target_s)
        return DELAY_MIN_S + (DELAY_MAX_S - DELAY_MIN_S) * overshoot
