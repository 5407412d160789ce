"""split --rw, the union of both sides' bitmaps, split brain, and a primary back after takeover.

PAIR ─split --rw─► PSUS / SSWS   hosts write both sites; each site marks its own bitmap
     ─resync─► the secondary leaves SSWS (read-only), hands its bitmap to the primary
               ─► COPY of the union ─► PAIR, S-VOL == P-VOL
both sites written ─► resync refused (split brain) unless --discard-secondary
takeover while the primary is down ─► the primary comes back: told SSWS, it suspends (PSUE)
"""

from __future__ import annotations

import json
import shutil

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


def copied_bytes(primary: Daemon) -> int:
    """What the last copy sent, from its COPY -> PAIR event."""
    events = [json.loads(line) for line in pairctl(primary, "events").stdout.splitlines()]
    done = [e for e in events if e["old"] == "COPY" and e["new"] == "PAIR"]
    return int(done[-1]["copied_bytes"])


def split_rw(primary: Daemon, secondary: Daemon) -> None:
    out = pairctl(primary, "split", "--rw").stdout
    assert "SSWS" in out
    wait_state(secondary, "SSWS", 30)
    assert display(primary)["state"] == "PSUS"


def write_regions(daemon: Daemon, offsets: list[int], pattern: int) -> None:
    for offset in offsets:
        qemu_io(daemon.uri(), f"write -P {pattern:#x} {offset} {REGION}")


def test_split_rw_then_resync_copies_the_secondarys_changes_back(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    qemu_io(primary.uri(), f"write -P 0x11 0 {SIZE}")
    create_pair(primary, secondary)
    proc = qemu_io(secondary.uri(), "write -P 0x1 0 4k", check=False)
    assert proc.returncode != 0, "the S-VOL must be read-only while PAIR"

    split_rw(primary, secondary)
    assert volumes_equal(primary, secondary), "SSWS must start from the split point"
    on_secondary = [i * MiB for i in range(5)]
    write_regions(secondary, on_secondary, 0x22)  # a test on the S-VOL copy
    wait_until(
        lambda: display(secondary)["bitmap"]["dirty_bytes"] == len(on_secondary) * REGION,
        10,
        "the secondary's bitmap to mark its writes",
    )

    pairctl(primary, "resync")  # only the secondary was written: its changes are discarded
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    assert copied_bytes(primary) == len(on_secondary) * REGION
    assert display(secondary)["bitmap"]["dirty_bytes"] == 0
    wait_state(secondary, "PAIR", 30)  # it hears PAIR with the primary's next batch
    proc = qemu_io(secondary.uri(), "write -P 0x1 0 4k", check=False)
    assert proc.returncode != 0, "the S-VOL must be read-only again after the resync"


def test_split_brain_is_refused_until_told_which_side_wins(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    create_pair(primary, secondary)
    split_rw(primary, secondary)
    on_primary = [i * 2 * MiB for i in range(4)]
    on_secondary = [i * 2 * MiB + MiB for i in range(3)] + [0]  # one region written on both
    write_regions(primary, on_primary, 0x33)
    write_regions(secondary, on_secondary, 0x44)
    # Both sides persist "written while split" within a second; the primary hears the
    # secondary's on its next Hello, so make it reconnect.
    wait_until(lambda: display(secondary)["bitmap"]["dirty_bytes"] > 0, 10, "marks")
    secondary.stop()
    secondary.start()
    wait_until(lambda: display(primary)["split_brain"], 15, "the primary to see the split brain")

    proc = pairctl(primary, "resync", check=False)
    assert proc.returncode == 1
    assert "split brain" in proc.stderr and "--discard-secondary" in proc.stderr
    assert display(primary)["state"] == "PSUS" and display(secondary)["state"] == "SSWS"

    pairctl(primary, "resync", "--discard-secondary")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    union = {o // REGION for o in on_primary} | {o // REGION for o in on_secondary}
    assert copied_bytes(primary) == len(union) * REGION
    assert not display(primary)["split_brain"]


def test_a_primary_back_after_a_takeover_suspends_and_resync_needs_a_decision(
    daemons: Daemons,
) -> None:
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x55 0 1M")
    wait_caught_up(primary)
    primary.kill()
    wait_until(lambda: not display(secondary)["link"]["up"], 30, "the link to drop")
    assert pairctl(secondary, "takeover", check=False).returncode == 2
    qemu_io(secondary.uri(), "write -P 0x66 8M 64k")  # production runs on the secondary now

    primary.start()  # it still believes PAIR; the secondary's Hello says SSWS
    wait_state(primary, "PSUE", 30)
    assert "took over" in display(primary)["reason"]
    assert display(secondary)["state"] == "SSWS"
    wait_until(lambda: display(primary)["peer"]["written_while_split"], 15, "the peer's writes")
    proc = pairctl(primary, "resync", check=False)
    assert proc.returncode == 1 and "took over" in proc.stderr, proc.stderr
    sha = sha256_file(secondary.volume().path)
    assert display(secondary)["state"] == "SSWS"
    assert sha256_file(secondary.volume().path) == sha, "a refused resync changed the S-VOL"

    pairctl(primary, "resync", "--discard-secondary")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)


def test_a_wiped_secondary_site_gets_a_full_copy_not_a_false_pair(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    qemu_io(primary.uri(), "write -P 0x77 0 8M")
    create_pair(primary, secondary)
    secondary.stop()
    shutil.rmtree(secondary.config_path.parent / "data")  # a replaced site: state gone
    with open(secondary.volume().path, "r+b") as image:
        image.write(b"\xee" * MiB)  # and its volume not what the primary holds

    secondary.start()
    wait_state(primary, "PSUE", 15)
    assert "not paired" in display(primary)["reason"]
    assert display(primary)["bitmap"]["dirty_bytes"] == SIZE
    shown = display(secondary)
    assert shown["state"] == "SMPL", "a site that never copied this generation is not PAIR"
    assert "never copied" in shown["link"]["why"]

    pairctl(primary, "resync")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)


@pytest.mark.parametrize("killed", ["primary", "secondary"])
def test_marks_made_just_before_a_kill_are_not_lost(daemons: Daemons, killed: str) -> None:
    """Bitmaps are saved once a second; the mark log keeps the marks of that second."""
    primary, secondary = daemons.start_pair((("vol0", SIZE),))
    create_pair(primary, secondary)
    split_rw(primary, secondary)
    site = primary if killed == "primary" else secondary
    offsets = [i * 3 * MiB for i in range(6)]
    write_regions(site, offsets, 0x5E)
    site.kill()  # well within a second of the writes: no bitmap save in between
    site.start()
    assert display(site)["bitmap"]["dirty_bytes"] == len(offsets) * REGION
    wait_until(lambda: display(primary)["link"]["up"], 15, "the link")
    pairctl(primary, "resync", "--discard-secondary")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    assert copied_bytes(primary) == len(offsets) * REGION


def test_sites_with_different_bitmap_regions_resync_the_union(daemons: Daemons) -> None:
    primary = daemons.prepare("primary", (("vol0", SIZE),))
    primary.start()
    secondary = daemons.prepare(
        "secondary", (("vol0", SIZE),), primary_port=primary.peer_port, pair={"bitmap_region": 4096}
    )
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    create_pair(primary, secondary)
    split_rw(primary, secondary)
    for offset in (0, 5 * MiB, 9 * MiB + 8192):
        qemu_io(secondary.uri(), f"write -P 0x31 {offset} 4k")
    wait_until(lambda: display(secondary)["bitmap"]["dirty_bytes"] == 3 * 4096, 10, "4 KiB marks")
    pairctl(primary, "resync")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    assert copied_bytes(primary) == 3 * REGION  # the primary's 64 KiB grid
