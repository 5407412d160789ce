"""secondaryd.swapped: what a site a swap made the secondary answers to the other site's Hello."""

from __future__ import annotations

import asyncio

from common.pairrecord import PairRecord
from common.pairstate import PairState, Role
from common.replication.messages import (
    PROTOCOL_VERSION,
    Hello,
    ReadJournal,
    Refuse,
    RefuseCode,
    SwapKind,
    Swapped,
    VolumeDesc,
)
from secondaryd.swapped import SwappedOutAnswerer

VOLUMES = (VolumeDesc("vol0", 1 << 20),)


def swapped_out(kind: str = "commit") -> PairRecord:
    record = PairRecord(Role.SECONDARY, PairState.PAIR, generation="")
    record.swapped_out_of, record.swapped_out_seq, record.swapped_out_kind = "gen-a", 812, kind
    return record


def hello(generation: str, group: str = "jg0") -> Hello:
    return Hello(PROTOCOL_VERSION, group, generation, 812, 812, VOLUMES, "PSUE")


def test_the_site_that_asked_for_the_swap_learns_that_it_took_place() -> None:
    answerer = SwappedOutAnswerer("jg0", swapped_out())
    answer = answerer.welcome(hello("gen-a"), "10.0.0.2:5000")
    assert answer == Swapped("jg0", "gen-a", 812, SwapKind.COMMIT)
    resync = SwappedOutAnswerer("jg0", swapped_out("resync")).welcome(hello("gen-a"), "peer")
    assert isinstance(resync, Swapped) and resync.kind is SwapKind.RESYNC


def test_any_other_site_is_told_this_is_a_secondary() -> None:
    answerer = SwappedOutAnswerer("jg0", swapped_out())
    other_generation = answerer.welcome(hello("gen-b"), "peer")
    assert isinstance(other_generation, Refuse)
    assert other_generation.code is RefuseCode.NOT_PRIMARY
    assert "generation gen-a" in other_generation.reason
    assert "generation gen-b" in other_generation.reason
    other_group = answerer.welcome(hello("gen-a", group="jg9"), "peer")
    assert isinstance(other_group, Refuse) and other_group.code is RefuseCode.GROUP


def test_once_settled_nobody_is_told_of_the_swap() -> None:
    record = swapped_out()
    answerer = SwappedOutAnswerer("jg0", record)
    record.swapped_out_of, record.swapped_out_seq, record.swapped_out_kind = "", 0, ""
    answer = answerer.welcome(hello("gen-a"), "peer")
    assert isinstance(answer, Refuse) and answer.code is RefuseCode.NOT_PRIMARY
    request = ReadJournal(1, 1, 1, 0, 0, 0)
    assert isinstance(asyncio.run(answerer.read_journal(request)), Refuse)
