"""AnswerSizer: a ReadJournal asks for what the link carried in a share of path_watch_s."""

from __future__ import annotations

from secondaryd.puller import (
    BATCH_BYTES_FIRST,
    BATCH_BYTES_MAX,
    BATCH_BYTES_MIN,
    BATCH_GROWTH_MAX,
    AnswerSizer,
)

MiB = 1 << 20


def test_a_slow_link_gets_answers_that_cross_within_answer_s() -> None:
    sizer = AnswerSizer(answer_s=0.5)
    sizer.measured(BATCH_BYTES_FIRST, 1.0)  # 1 MiB/s
    assert sizer.max_bytes == MiB // 2


def test_a_fast_link_grows_by_a_bounded_factor_up_to_the_maximum() -> None:
    sizer = AnswerSizer(answer_s=0.5)
    sizer.measured(BATCH_BYTES_FIRST, 0.001)
    assert sizer.max_bytes == BATCH_BYTES_FIRST * BATCH_GROWTH_MAX
    for _ in range(4):
        sizer.measured(sizer.max_bytes, 0.001)
    assert sizer.max_bytes == BATCH_BYTES_MAX


def test_short_and_untimed_answers_change_nothing() -> None:
    sizer = AnswerSizer(answer_s=0.5)
    sizer.measured(BATCH_BYTES_FIRST // 4, 10.0)  # the journal held little: not the link
    sizer.measured(BATCH_BYTES_FIRST, None)  # read at once from what had come meanwhile
    assert sizer.max_bytes == BATCH_BYTES_FIRST


def test_a_crawling_link_stays_at_the_minimum() -> None:
    sizer = AnswerSizer(answer_s=0.5)
    sizer.measured(BATCH_BYTES_FIRST, 60.0)
    assert sizer.max_bytes == BATCH_BYTES_MIN
