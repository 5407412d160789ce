"""Split, resync (only what the bitmaps mark), delete, and a full journal resynced.

PAIR ─split─► PSUS / SSUS   S-VOL frozen at the split point, host writes -> bitmap
     ─resync─► COPY ─► PAIR copies the marked regions only, S-VOL == P-VOL again
     ─delete─► SMPL on both sides; create starts over
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    KiB,
    MiB,
    create_pair,
    display,
    pairctl,
    qemu_io,
    sha256_file,
    volumes_equal,
    wait_caught_up,
    wait_state,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SIZE = 64 * MiB
REGION = 64 * KiB


def paired_with_journal(daemons: Daemons, capacity: str, **pair: float) -> tuple[Daemon, Daemon]:
    """A PAIR whose primary has a journal of `capacity` (the configs default to 64MiB)."""
    primary = daemons.prepare("primary", (("vol0", SIZE),), pair=pair or None)
    config = primary.config_path.read_text().replace("capacity: 64MiB", f"capacity: {capacity}")
    primary.config_path.write_text(config)
    primary.start()
    secondary = daemons.prepare("secondary", (("vol0", SIZE),), primary_port=primary.peer_port)
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    create_pair(primary, secondary)
    return primary, secondary


def copy_total(primary: Daemon) -> int:
    """The resync's size, from the transition event that started it."""
    events = pairctl(primary, "events").stdout.splitlines()
    reason = [e for e in events if '"COPY"' in e and "resync" in e][-1]
    return int(reason.split("resync by operator: ")[1].split(" bytes")[0])


def test_split_freezes_the_s_vol_and_resync_copies_only_what_changed(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    qemu_io(primary.uri(), f"write -P 0x11 0 {SIZE}")
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x22 1M 64k")  # journaled: reaches the S-VOL by the split
    out = pairctl(primary, "split")
    assert "PSUS" in out.stdout
    assert display(primary)["state"] == "PSUS"
    wait_state(secondary, "SSUS", 30)
    assert volumes_equal(primary, secondary), "the S-VOL is not the P-VOL at the split point"
    frozen = sha256_file(secondary.volume().path)

    changed = [i * 640 * KiB for i in range(10)]  # 10 regions of 64 KiB: 1% of the volume
    for offset in changed:
        qemu_io(primary.uri(), f"write -P 0x33 {offset} {REGION}")
    assert sha256_file(secondary.volume().path) == frozen, "writes after the split leaked"
    assert display(primary)["bitmap"]["dirty_bytes"] == len(changed) * REGION

    pairctl(primary, "resync")
    assert copy_total(primary) == len(changed) * REGION  # not the volume's 64 MiB
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    assert display(primary)["bitmap"]["dirty_bytes"] == 0
    wait_state(secondary, "PAIR", 30)


def test_operations_refused_in_the_wrong_state_say_why(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    proc = pairctl(primary, "resync", check=False)
    assert proc.returncode == 1 and "cannot resync: pair is SMPL" in proc.stderr
    create_pair(primary, secondary)
    proc = pairctl(primary, "resync", check=False)
    assert proc.returncode == 1 and "cannot resync: pair is PAIR" in proc.stderr
    proc = pairctl(primary, "create", check=False)
    assert proc.returncode == 1 and "cannot create: pair is PAIR" in proc.stderr
    assert display(primary)["state"] == "PAIR"


def test_delete_returns_both_sides_to_smpl_and_create_starts_over(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    create_pair(primary, secondary)
    pairctl(primary, "delete")
    assert display(primary)["state"] == "SMPL"
    wait_state(secondary, "SMPL", 30)
    qemu_io(primary.uri(), "write -P 0x44 0 1M")  # not replicated while SMPL
    assert display(primary)["lag"]["entries"] == 0
    create_pair(primary, secondary)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)


def test_a_full_journal_suspends_then_resync_brings_the_pair_back(daemons: Daemons) -> None:
    primary, secondary = paired_with_journal(daemons, "8MiB")
    os.kill(secondary.pid, signal.SIGSTOP)
    try:
        qemu_io(primary.uri(), "write -P 0x55 0 16M")  # twice the journal: never fails
        assert display(primary)["state"] == "PFUS"
    finally:
        os.kill(secondary.pid, signal.SIGCONT)
    wait_state(secondary, "PFUS", 30)
    pairctl(primary, "resync")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)


def test_journal_over_the_high_water_mark_is_pful_and_back_under_is_pair(
    daemons: Daemons,
) -> None:
    primary, secondary = paired_with_journal(daemons, "16MiB")
    os.kill(secondary.pid, signal.SIGSTOP)
    try:
        qemu_io(primary.uri(), "write -P 0x66 0 14M")  # ~85% of the journal, not full
        wait_state(primary, "PFUL", 10)
        assert "full" in display(primary)["reason"]
    finally:
        os.kill(secondary.pid, signal.SIGCONT)
    wait_state(primary, "PAIR", 30)  # drained back under the mark
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    states = [e for e in pairctl(primary, "events").stdout.splitlines() if "PFUL" in e]
    assert len(states) == 2  # PAIR -> PFUL, PFUL -> PAIR


def test_a_journal_over_the_mark_past_overflow_watch_suspends_pfus(daemons: Daemons) -> None:
    primary, secondary = paired_with_journal(daemons, "16MiB", overflow_watch_s=1)
    os.kill(secondary.pid, signal.SIGSTOP)
    try:
        qemu_io(primary.uri(), "write -P 0x67 0 14M")  # over the mark, never full
        wait_state(primary, "PFUL", 10)
        wait_state(primary, "PFUS", 10)  # after overflow_watch_s, not when full
        assert "overflow_watch_s" in display(primary)["reason"]
        assert display(primary)["journal"]["used_bytes"] < 4096  # emptied: the bitmap took over
        qemu_io(primary.uri(), "write -P 0x68 20M 1M")
    finally:
        os.kill(secondary.pid, signal.SIGCONT)
    wait_state(secondary, "PFUS", 30)
    pairctl(primary, "resync")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
