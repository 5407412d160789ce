"""Disk faults: a clear error and a safe state, never a daemon that stops serving its hosts
(or loops under its supervisor), never silent corruption.

    at start   a damaged master journal ─► PSUE, every region marked, the journal set aside
               a damaged restore journal ─► the secondary SMPL, the primary PSUE
    running    the master journal's disk full ─► PSUE, host writes go on (marked)
               the restore journal's / an S-VOL's disk full ─► PSUE on both sides (the
                 secondary tells the primary in its Hello), host writes go on
               a record damaged on the primary's disk: its header ─► the primary sees it
                 when it reads; its payload ─► the secondary refuses the batch twice;
                 either way PSUE with every region marked
    then       the disk repaired (a tmpfs remounted bigger) ─► resync ─► PAIR, S-VOL == P-VOL
A full disk is a small tmpfs mounted where the journal or the S-VOL lives.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.journal.record import HEADER_BYTES, peek_header
from common.journal.store import SEGMENT_HEADER_BYTES
from tests.e2e.helpers import (
    Daemon,
    Daemons,
    MiB,
    Volume,
    create_pair,
    display,
    pairctl,
    qemu_io,
    volumes_equal,
    wait_state,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SMALL_DISK = "4m"  # a tmpfs this size fills up with 8 MiB of host writes


@pytest.fixture
def small_disks() -> Iterator[list[Path]]:
    """Directories to mount a SMALL_DISK tmpfs on (append them); unmounted at the end."""
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _mount_small_disk(small_disks: list[Path], path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(path)], check=True
    )
    small_disks.append(path)


def _grow_disk(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=256m", str(path)], check=True)


def wait_link_up(primary: Daemon) -> None:
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")


def _write_8_mib(primary: Daemon) -> None:
    """Host writes that must all succeed whatever the journal's disk does."""
    for i in range(8):
        qemu_io(primary.uri(), f"write -P {0x31 + i:#x} {i}M 1M")


def _resync_until_equal(primary: Daemon, secondary: Daemon, *options: str) -> None:
    """The documented way back: resync, both sides PAIR, S-VOL == P-VOL."""
    pairctl(primary, "resync", *options)
    wait_state(primary, "PAIR", 60)
    wait_state(secondary, "PAIR", 60)
    assert volumes_equal(primary, secondary)


def _record_offset(journal_dir: Path, seq: int) -> tuple[Path, int]:
    """The segment file holding record `seq`, and the record's offset in it."""
    for segment in sorted(journal_dir.glob("*.seg")):
        data = segment.read_bytes()
        pos = SEGMENT_HEADER_BYTES
        while pos + HEADER_BYTES <= len(data):
            found, size = peek_header(data, pos)
            if found == seq:
                return segment, pos
            pos += size
    raise AssertionError(f"no record {seq} in {journal_dir}")


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
    _resync_until_equal(primary, secondary)


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

    _resync_until_equal(primary, secondary)


def test_a_full_master_journal_disk_suspends_the_pair_and_host_writes_go_on(
    daemons: Daemons, small_disks: list[Path]
) -> None:
    primary = daemons.prepare("primary")
    journal_dir = primary.config_path.parent / "data" / "journal"
    _mount_small_disk(small_disks, journal_dir)
    primary.start()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port)
    secondary.start()
    wait_link_up(primary)
    create_pair(primary, secondary)
    secondary.stop()  # nothing is released: the journal fills its 4 MiB disk

    _write_8_mib(primary)
    state = display(primary)
    assert state["state"] == "PSUE", state
    assert state["reason"].startswith("journal disk error: "), state["reason"]
    assert "No space left on device" in state["reason"]
    assert state["bitmap"]["dirty_bytes"] >= 8 * MiB  # what the journal could not hold
    assert "suspending the pair; host writes go on" in primary.log_text()

    _grow_disk(journal_dir)
    secondary.start()
    _resync_until_equal(primary, secondary)


def test_a_full_restore_journal_disk_suspends_both_sides_and_host_writes_go_on(
    daemons: Daemons, small_disks: list[Path]
) -> None:
    primary = daemons.start_primary()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port)
    restore_dir = secondary.config_path.parent / "data" / "restore"
    _mount_small_disk(small_disks, restore_dir)
    secondary.start()
    wait_link_up(primary)
    create_pair(primary, secondary)

    _write_8_mib(primary)
    wait_state(secondary, "PSUE", 30)
    wait_state(primary, "PSUE", 30)
    for side in (primary, secondary):
        reason = display(side)["reason"]
        assert reason.startswith("secondary failure: "), reason
        assert "No space left on device" in reason
    qemu_io(primary.uri(), "write -P 0x66 9M 64k")  # hosts still write

    _grow_disk(restore_dir)
    _resync_until_equal(primary, secondary)


def test_a_full_s_vol_disk_suspends_both_sides_and_a_resync_repairs_it(
    daemons: Daemons, small_disks: list[Path]
) -> None:
    primary = daemons.start_primary()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port)
    svol_dir = secondary.config_path.parent / "svols"
    _mount_small_disk(small_disks, svol_dir)
    old = secondary.volumes["vol0"]
    secondary.volumes["vol0"] = Volume(old.name, old.size, svol_dir / "vol0.img")
    config = secondary.config_path.read_text()
    secondary.config_path.write_text(config.replace(str(old.path), str(svol_dir / "vol0.img")))
    secondary.start()
    wait_link_up(primary)
    create_pair(primary, secondary)  # the volume is empty: the copy allocates nothing

    _write_8_mib(primary)
    wait_state(secondary, "PSUE", 30)
    wait_state(primary, "PSUE", 30)
    reason = display(secondary)["reason"]
    assert reason.startswith("secondary failure: cannot apply the journal to the S-VOLs"), reason
    assert display(secondary)["destage_error"]

    _grow_disk(svol_dir)
    _resync_until_equal(primary, secondary)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_a_record_damaged_on_the_primary_disk_suspends_the_pair_with_every_region_marked(
    daemons: Daemons, where: str
) -> None:
    primary, secondary = daemons.start_pair()
    create_pair(primary, secondary)
    secondary.stop()
    qemu_io(primary.uri(), "write -P 0x41 0 1M", "write -P 0x42 4M 1M")
    seq = display(primary)["seq"]
    segment, offset = _record_offset(
        primary.config_path.parent / "data" / "journal", seq["restored"] + 1
    )
    # The page cache is the file: the running primary reads the damage back.
    _flip_byte(segment, offset + (30 if where == "header" else HEADER_BYTES + 100))

    secondary.start()
    wait_state(primary, "PSUE", 30)
    state = display(primary)
    expected = "master journal damaged: " if where == "header" else "secondary failure: "
    assert state["reason"].startswith(expected), state["reason"]
    assert state["bitmap"]["dirty_bytes"] == primary.volume().size  # nothing to go by
    qemu_io(primary.uri(), "write -P 0x43 8M 64k")

    _resync_until_equal(primary, secondary)


def _truncate_half(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("side", ["primary", "secondary"])
def test_a_truncated_pair_state_file_starts_the_site_smpl_and_a_full_copy_follows(
    daemons: Daemons, side: str
) -> None:
    primary, secondary = daemons.start_pair()
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x51 0 1M")
    pairctl(primary, "split")
    qemu_io(primary.uri(), "write -P 0x52 4M 1M")
    site = primary if side == "primary" else secondary
    site.stop()
    data_dir = site.config_path.parent / "data"
    _truncate_half(data_dir / "pair.json")

    site.start()  # it starts, no longer claiming to be paired
    state = display(site)
    assert state["state"] == "SMPL", state
    assert state["reason"].startswith("pair state lost: "), state["reason"]
    assert list(data_dir.glob("pair.json.corrupt-*")), "the damaged file is kept aside"
    wait_link_up(primary)
    if side == "primary":
        create_pair(primary, secondary)  # the pair is made again: a whole copy
        assert volumes_equal(primary, secondary)
    else:
        # Its Hello says SMPL: nothing of the S-VOL is known, the primary marks everything.
        wait_until(
            lambda: display(primary)["bitmap"]["dirty_bytes"] == primary.volume().size,
            30,
            "the primary to mark every region",
        )
        _resync_until_equal(primary, secondary)


@pytest.mark.parametrize("side", ["primary", "secondary"])
def test_a_truncated_bitmap_marks_every_region_and_the_resync_copies_them(
    daemons: Daemons, side: str
) -> None:
    primary, secondary = daemons.start_pair()
    create_pair(primary, secondary)
    pairctl(primary, "split", "--rw")  # both sides may mark
    wait_state(secondary, "SSWS", 30)
    qemu_io(primary.uri(), "write -P 0x61 0 1M")
    qemu_io(secondary.uri(), "write -P 0x62 8M 1M")
    site = primary if side == "primary" else secondary
    site.stop()
    bitmap = site.config_path.parent / "data" / "bitmaps" / "vol0.bitmap"
    _truncate_half(bitmap)

    site.start()
    assert list(bitmap.parent.glob("vol0.bitmap.corrupt-*")), "the damaged file is kept aside"
    assert "every region of the volume is marked" in site.log_text()
    wait_link_up(primary)
    _resync_until_equal(primary, secondary, "--discard-secondary")
