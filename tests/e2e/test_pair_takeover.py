"""Takeover on the secondary when the primary site is lost (SSWS), and its refusals.

writer (QD1, numbered blocks) ─► primary ══ SIGKILL mid-load
pairctl takeover on the secondary ─► exit 2, SSWS: destaged, S-VOLs read-write over NBD
the S-VOLs hold exactly writes 1..K of the acknowledged order; writes lost = acked - K
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.helpers import (
    Daemons,
    create_pair,
    display,
    pairctl,
    qemu_io,
    wait_until,
)
from tests.e2e.test_pair_crash import VOLUMES, Writer, assert_prefix_state, read_slots

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_takeover_after_the_primary_is_killed_mid_load_serves_a_prefix_read_write(
    daemons: Daemons,
) -> None:
    primary, secondary = daemons.start_pair(VOLUMES)
    create_pair(primary, secondary)
    writer = Writer(primary, seed=31)
    started = time.monotonic()
    writer.start()
    wait_until(lambda: len(writer.acked) > 2000, 60, "writes")
    primary.kill()
    rate = (len(writer.acked) - 1) / (time.monotonic() - started)
    writer.finish_after_kill()
    wait_until(lambda: not display(secondary)["link"]["up"], 30, "the secondary to lose the link")

    proc = pairctl(secondary, "takeover", check=False)
    assert proc.returncode == 2, proc.stderr  # HUR: 2 = S-VOL takeover
    shown = display(secondary)
    assert shown["state"] == "SSWS" and "does not answer" in shown["reason"]
    k = assert_prefix_state(read_slots(secondary), writer.acked)
    lost = len(writer.acked) - 1 - k
    print(
        f"RPO: {lost} acknowledged writes lost of {len(writer.acked) - 1} "
        f"(~{lost / rate * 1000:.1f} ms at {rate:.0f} QD1 writes/s)"
    )
    assert 0 <= lost < len(writer.acked) - 1

    qemu_io(secondary.uri("vol0"), "write -P 0x7e 0 64k")  # the S-VOL is writable now
    assert display(secondary)["bitmap"]["dirty_bytes"] >= 64 * 1024
    secondary.stop()
    secondary.start()  # SSWS persists: still writable, still not pulling
    assert display(secondary)["state"] == "SSWS"
    qemu_io(secondary.uri("vol1"), "write -P 0x7f 0 4k")


def test_a_swap_takeover_is_refused_when_this_site_cannot_serve_as_primary(
    daemons: Daemons,
) -> None:
    """The primary answers, so takeover swaps roles; without listen.replication in this
    site's config it cannot, and nothing changes (test_pair_swap has the swap itself)."""
    primary, secondary = daemons.start_pair(VOLUMES)
    create_pair(primary, secondary)
    proc = pairctl(secondary, "takeover", check=False)
    assert proc.returncode == 1
    assert "cannot become the primary: its config has no listen.replication" in proc.stderr
    assert display(secondary)["state"] == "PAIR"
    proc = qemu_io(secondary.uri("vol0"), "write -P 0x1 0 4k", check=False)
    assert proc.returncode != 0, "the S-VOL must stay read-only"


def test_takeover_is_refused_before_the_copy_completed(daemons: Daemons) -> None:
    """An S-VOL that never finished its copy is not a consistent image."""
    primary, secondary = daemons.start_pair(VOLUMES)
    primary.kill()  # SMPL: never paired
    wait_until(lambda: not display(secondary)["link"]["up"], 30, "the link to drop")
    proc = pairctl(secondary, "takeover", check=False)
    assert proc.returncode == 1
    assert "cannot takeover: pair is SMPL" in proc.stderr
