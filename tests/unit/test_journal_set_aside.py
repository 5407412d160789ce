"""common.service.open_journal_or_set_aside: a damaged master journal is moved aside, and
the loss is remembered until the group has marked every region (a kill in between); and
open_journal warns when the filesystem cannot hold journal.capacity."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from common.journal.record import Op, encode_record
from common.journal.store import SEGMENT_HEADER_BYTES, JournalStore
from common.service import journal_loss_handled, open_journal, open_journal_or_set_aside

MiB = 1 << 20


def _journal_with_a_damaged_first_record(directory: Path) -> None:
    store, _ = JournalStore.open(directory, 16 * MiB)
    for seq in (1, 2, 3):
        store.append(seq, encode_record(seq, "vol0", Op.WRITE, 0, 512, b"x" * 512, 0))
    store.close()
    (segment,) = directory.glob("*.seg")
    data = bytearray(segment.read_bytes())
    data[SEGMENT_HEADER_BYTES + 100] ^= 0xFF  # the first payload; intact records follow
    segment.write_bytes(bytes(data))


def test_a_damaged_journal_is_set_aside_and_the_loss_survives_a_kill(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    _journal_with_a_damaged_first_record(directory)

    store, why = open_journal_or_set_aside(directory, 16 * MiB)
    store.close()
    assert "payload crc mismatch" in why and "moved to journal.corrupt-" in why
    (aside,) = tmp_path.glob("journal.corrupt-*")
    assert len(list(aside.glob("*.seg"))) == 1  # kept for a post-mortem

    store, again = open_journal_or_set_aside(directory, 16 * MiB)  # killed before handled
    store.close()
    assert again == why

    journal_loss_handled(directory)
    store, after = open_journal_or_set_aside(directory, 16 * MiB)
    store.close()
    assert after == ""


def test_a_sound_journal_is_opened_as_it_is(tmp_path: Path) -> None:
    store, why = open_journal_or_set_aside(tmp_path / "journal", 16 * MiB)
    store.close()
    assert why == "" and not list(tmp_path.glob("journal.*"))


def test_a_capacity_larger_than_the_filesystem_is_told_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real 8 MiB tmpfs (root, like the disk-fault tests): a 64 MiB journal on it would
    hit ENOSPC first, and says so; a 4 MiB one fits and says nothing."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        with caplog.at_level(logging.WARNING, logger="journalpair"):
            open_journal(small / "too-big", 64 * MiB).close()
            open_journal(small / "fits", 4 * MiB).close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "too-big: journal.capacity is 64.0 MiB but its filesystem has room for" in warnings[0]
    assert "ENOSPC" in warnings[0]
