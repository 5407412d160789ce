"""Disk faults met at start: a damaged journal gives a clear error and a safe state, not a
daemon that refuses to start (and loops under its supervisor with its hosts down)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.helpers import (
    Daemons,
    create_pair,
    display,
    pairctl,
    qemu_io,
    volumes_equal,
    wait_state,
)


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_master_journal_suspends_the_pair_and_a_resync_repairs_it(
    daemons: Daemons,
) -> None:
    primary, secondary = daemons.start_pair()
    create_pair(primary, secondary)
    secondary.stop()  # what hosts write now stays in the master journal
    for i in range(3):
        qemu_io(primary.uri(), f"write -P {0x31 + i:#x} {i * 4}M 1M")
    primary.stop()
    data_dir = primary.config_path.parent / "data"
    (segment,) = [p for p in (data_dir / "journal").glob("*.seg") if p.stat().st_size > 4096]
    _flip_byte(segment, 20 + 48 + 100)  # inside the first record's payload; intact ones follow

    primary.start()  # it starts: hosts keep their volumes
    state = display(primary)
    assert state["state"] == "PSUE", state
    assert state["reason"].startswith("master journal lost:"), state["reason"]
    assert "payload crc mismatch" in state["reason"]
    assert list(data_dir.glob("journal.corrupt-*")), "the damaged journal is kept aside"
    assert not (data_dir / "journal.lost").exists()
    assert state["bitmap"]["dirty_bytes"] == primary.volume().size  # everything to copy
    qemu_io(primary.uri(), "write -P 0x77 8M 64k")

    secondary.start()
    pairctl(primary, "resync")
    wait_state(primary, "PAIR", 60)
    wait_state(secondary, "PAIR", 60)
    assert volumes_equal(primary, secondary)


def test_a_corrupt_restore_journal_makes_the_secondary_leave_the_pair_for_a_full_copy(
    daemons: Daemons,
) -> None:
    primary, secondary = daemons.start_pair()
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x41 1M 1M")
    secondary.stop()
    data_dir = secondary.config_path.parent / "data"
    segment = sorted((data_dir / "restore").glob("*.seg"))[-1]
    _flip_byte(segment, 2)  # the segment header's magic: not a torn tail

    secondary.start()  # it starts, no longer claiming to be a copy
    state = display(secondary)
    assert state["state"] == "SMPL", state
    assert state["reason"].startswith("restore journal lost:"), state["reason"]
    assert list(data_dir.glob("restore.corrupt-*")), "the damaged journal is kept aside"
    wait_state(primary, "PSUE", 30)  # its Hello says SMPL: the primary marks everything
    assert display(primary)["bitmap"]["dirty_bytes"] == primary.volume().size

    pairctl(primary, "resync")
    wait_state(primary, "PAIR", 60)
    wait_state(secondary, "PAIR", 60)
    assert volumes_equal(primary, secondary)
