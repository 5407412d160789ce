"""The disaster scenario, short: a few rounds of tests/e2e/disaster.py with random timing
(`make soak` runs the long, mixed version), and the prefix check itself checked.

    seed = $JP_DISASTER_SEED or random, printed: a failure replays with the same choices
    round 1: primary killed (QD1 + QD32 writers), takeover, check, resync --swap  A ─► B
    round 2: the same, the secondary killed too                                    B ─► A
    round 3: the same, the secondary killed too, on the other side of the kill     A ─► B
    each: 0 mismatches; the roles alternate, the pair back in PAIR and equal

check_prefix on hand-made states: a mix, a hole, a torn block, a stray byte, a write from
nowhere are mismatches; writes in flight together may land in either order.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.disaster import PairLab, RoundResult, disaster_round
from tests.e2e.writes import SLOTS, SlotImage, Write, check_prefix

SEED_ENV = "JP_DISASTER_SEED"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[PairLab]:
    lab = PairLab(tmp_path)
    ok = False
    try:
        yield lab.start()
        ok = True
    finally:
        lab.close(clean=ok)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_primary_killed_at_random_moments_the_s_vols_hold_a_prefix(lab: PairLab) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    print(f"disaster seed {seed} (replay: {SEED_ENV}={seed})")
    rng = random.Random(seed)
    results: list[RoundResult] = []
    for also_secondary in (None, "before", "after"):
        result = RoundResult("disaster", rng.randrange(1 << 32))
        disaster_round(lab, random.Random(result.seed), result, also_secondary)
        print(
            f"seed {result.seed}: {result.faults} acked {result.acked} lost {result.lost} "
            f"RPO {result.rpo_s:.3f} s"
        )
        assert not result.mismatches, f"seed {seed}, round seed {result.seed}: {result.mismatches}"
        results.append(result)
    assert all(r.acked > 0 for r in results)
    assert all(0 <= r.lost <= r.acked for r in results)


# --- the check, on states made by hand ------------------------------------------------------

MS = 1_000_000


def write(n: int, slot: int, submit_ms: int, ack_ms: int | None) -> Write:
    return Write(n, slot, submit_ms * MS, None if ack_ms is None else ack_ms * MS)


# slot 0: 1 then 3; slot 1: 2 then 5 (in flight with 4); slot 2: 4 (in flight with 5)
WRITES = [
    write(1, 0, 0, 1),
    write(2, 1, 2, 3),
    write(3, 0, 4, 5),
    write(4, 2, 6, 9),
    write(5, 1, 7, 8),
    write(6, 0, 10, None),  # never acknowledged: the kill came first
]


def image(**held: int | None) -> SlotImage:
    numbers: dict[int, int | None] = dict.fromkeys(range(SLOTS), 0)
    numbers.update({int(slot[1:]): n for slot, n in held.items()})
    return SlotImage(numbers)


def test_the_whole_order_and_every_prefix_of_it_pass() -> None:
    whole = check_prefix(image(s0=6, s1=5, s2=4), {}, WRITES)
    assert whole.ok and whole.lost == 0 and whole.included == 6
    after_three = check_prefix(image(s0=3, s1=2), {}, WRITES)
    assert after_three.ok and after_three.lost == 2
    assert after_three.rpo_s == pytest.approx((9 - 5) / 1000)
    nothing = check_prefix(image(), {}, WRITES)
    assert nothing.ok and nothing.lost == 5


def test_writes_in_flight_together_may_land_in_either_order() -> None:
    assert check_prefix(image(s0=3, s1=5), {}, WRITES).ok  # 5 without 4
    assert check_prefix(image(s0=3, s1=2, s2=4), {}, WRITES).ok  # 4 without 5


def test_a_mix_is_a_mismatch() -> None:
    """Slot 1 holds write 5 but slot 0 still write 1: write 3 (slot 0) was acknowledged
    (5 ms) before write 5 was submitted (7 ms)."""
    verdict = check_prefix(image(s0=1, s1=5), {}, WRITES)
    assert not verdict.ok
    assert any("slot 1: holds write 5" in m and "write 3" in m for m in verdict.mismatches)


def test_a_hole_in_the_prefix_is_a_mismatch() -> None:
    """Write 2 (slot 1) is missing, write 3 (slot 0, submitted after 2's ack) is there."""
    verdict = check_prefix(image(s0=3), {}, WRITES)
    assert not verdict.ok and len(verdict.mismatches) == 1


def test_torn_foreign_and_stray_content_are_mismatches() -> None:
    assert not check_prefix(image(s0=None), {}, WRITES).ok  # not one whole block
    assert not check_prefix(image(s2=5), {}, WRITES).ok  # write 5 went to slot 1
    assert not check_prefix(image(s0=99), {}, WRITES).ok  # never written
    stray = image(s0=1)
    stray.stray.append("vol0: non-zero bytes between slots at 4096")
    assert not check_prefix(stray, {}, WRITES).ok


def test_the_baseline_is_a_slot_s_content_before_the_round() -> None:
    assert check_prefix(image(s0=1, s7=77), {7: 77}, WRITES).ok
    assert not check_prefix(image(s0=1, s7=0), {7: 77}, WRITES).ok
