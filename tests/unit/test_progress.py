"""RateMeter (time passed in) and CopyProgress's applied bytes, from the copy's seq marks."""

from __future__ import annotations

import pytest

from common.progress import MEASURED_MIN_S, SAMPLE_EVERY_S, SAMPLES_MAX, RateMeter
from primaryd.copier import MARKS_MAX, CopyProgress

MiB = 1 << 20


def test_no_rate_before_enough_history() -> None:
    meter = RateMeter()
    assert meter.rate_bytes_per_s(100.0) is None
    meter.update(0, 100.0)
    meter.update(MiB, 100.0 + MEASURED_MIN_S / 2)
    assert meter.rate_bytes_per_s(100.0 + MEASURED_MIN_S / 2) is None
    assert meter.eta_s(10 * MiB, 100.0 + MEASURED_MIN_S / 2) is None


def test_steady_copy_rate_and_eta() -> None:
    meter = RateMeter()
    rate = 8 * MiB
    for tick in range(11):  # 5 s of a steady copy
        meter.update(int(rate * tick * SAMPLE_EVERY_S), tick * SAMPLE_EVERY_S)
    now = 10 * SAMPLE_EVERY_S
    assert meter.rate_bytes_per_s(now) == pytest.approx(rate)
    done = rate * now
    assert meter.eta_s(int(done + 4 * rate), now) == pytest.approx(4.0)
    assert meter.eta_s(int(done) - 1, now) == 0  # past the total: nothing left


def test_a_stalled_copy_shows_a_falling_rate() -> None:
    meter = RateMeter()
    meter.update(0, 0.0)
    meter.update(10 * MiB, 1.0)
    assert meter.rate_bytes_per_s(1.0) == pytest.approx(10 * MiB)
    assert meter.rate_bytes_per_s(10.0) == pytest.approx(MiB)  # nothing since: measured to now
    assert meter.eta_s(20 * MiB, 10.0) == pytest.approx(10.0)


def test_history_is_bounded_and_forgets_the_old_rate() -> None:
    meter = RateMeter()
    fast, slow = 100 * MiB, MiB
    now, done = 0.0, 0
    for _ in range(SAMPLES_MAX):
        meter.update(done, now)
        now, done = now + SAMPLE_EVERY_S, done + int(fast * SAMPLE_EVERY_S)
    for _ in range(SAMPLES_MAX + 1):  # a whole history of the slow rate
        meter.update(done, now)
        now, done = now + SAMPLE_EVERY_S, done + int(slow * SAMPLE_EVERY_S)
    assert len(meter._samples) == SAMPLES_MAX
    assert meter.rate_bytes_per_s(now - SAMPLE_EVERY_S) == pytest.approx(slow, rel=0.05)


def test_samples_closer_than_the_spacing_keep_the_latest_done() -> None:
    meter = RateMeter()
    meter.update(0, 0.0)
    for step in range(1, 100):  # many updates within one spacing
        meter.update(step * 1000, step * SAMPLE_EVERY_S / 100)
    meter.update(2 * MiB, 2.0)
    assert len(meter._samples) == 2
    assert meter.rate_bytes_per_s(2.0) == pytest.approx(MiB)


def test_a_new_pass_restarts_the_history() -> None:
    meter = RateMeter()
    meter.update(0, 0.0)
    meter.update(50 * MiB, 5.0)
    meter.update(0, 6.0)  # done went down: the copy's second pass
    assert meter.rate_bytes_per_s(6.5) is None
    meter.update(2 * MiB, 8.0)
    assert meter.rate_bytes_per_s(8.0) == pytest.approx(MiB)


def test_copy_progress_applied_bytes_follow_the_secondary_seq() -> None:
    progress = CopyProgress()
    progress.restart(10 * MiB)
    for seq in range(1, 11):  # ten 1 MiB records, seqs 1..10
        progress.journaled(seq, MiB)
    progress.advance(4 * MiB)
    progress.secondary_applied(0)
    assert progress.applied_bytes == 0
    progress.secondary_applied(3)
    assert progress.applied_bytes == 3 * MiB
    progress.secondary_applied(100)  # later host writes: the whole pass is applied
    assert progress.applied_bytes == 10 * MiB
    assert progress.done_bytes == 4 * MiB  # sent, counted apart
    progress.restart(MiB)
    assert (progress.applied_bytes, progress.done_bytes) == (0, 0)
    progress.secondary_applied(10)  # the first pass's seqs are not this pass's
    assert progress.applied_bytes == 0


def test_copy_progress_marks_are_bounded() -> None:
    progress = CopyProgress()
    records = 10 * MARKS_MAX
    progress.restart(records * MiB)
    for seq in range(1, records + 1):
        progress.journaled(seq, MiB)
    assert len(progress._mark_seqs) <= MARKS_MAX + 1
    progress.secondary_applied(records // 2 + 3)  # between two marks: the one below counts
    assert records // 2 * MiB - progress.total_bytes // MARKS_MAX <= progress.applied_bytes
    assert progress.applied_bytes <= (records // 2 + 3) * MiB
    progress.secondary_applied(records)
    assert progress.applied_bytes == records * MiB
