"""The primary killed while a host writes over iSCSI: what it acknowledged is on the P-VOL,
and after a takeover the S-VOLs hold a prefix of it, as with NBD (test_pair_disaster.py).

    IscsiBlockWriter ─ iSCSI ─► primaryd ──journal──► secondaryd
        numbered blocks, QD1       SIGKILL at a random moment
    P-VOL files: every acknowledged write          (the page cache survives a SIGKILL)
    takeover on the secondary (SSWS): S-VOLs == a happens-before-closed prefix (check_prefix)
"""

from __future__ import annotations

import os
import random

import pytest

from tests.e2e.helpers import Daemons, create_pair, display, pairctl, wait_until
from tests.e2e.iscsihost import IscsiBlockWriter, with_iscsi
from tests.e2e.writes import SLOTS, VOLUMES, check_prefix, read_files, write_numbers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SEED_ENV = "JOURNALPAIR_ISCSI_CRASH_SEED"


def test_primary_killed_under_iscsi_writes_the_s_vols_hold_a_prefix(daemons: Daemons) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    print(f"seed {seed} (replay: {SEED_ENV}={seed})")
    rng = random.Random(seed)
    primary = with_iscsi(daemons.prepare("primary", VOLUMES))
    primary.start()
    secondary = daemons.prepare("secondary", VOLUMES, primary_port=primary.peer_port)
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    create_pair(primary, secondary)

    copied_up_to = display(primary)["seq"]["last"]  # the base journal's records

    writer = IscsiBlockWriter(primary, range(SLOTS), write_numbers(), rng.randrange(1 << 32))
    writer.start()
    enough = 300 + rng.randrange(1500)
    wait_until(lambda: writer.acked() >= enough or not writer.is_alive(), 60, f"{enough} writes")
    assert writer.ended_by is None, f"the writer failed before the kill: {writer.ended_by!r}"
    # host writes the secondary holds durably (a takeover applies them): a floor for the S-VOL
    restored = display(primary)["seq"]["restored"] - copied_up_to
    primary.kill()
    writer.finish_after_kill()
    writes = writer.snapshot()

    on_pvol = check_prefix(read_files(primary), {}, writes)
    assert not on_pvol.mismatches, on_pvol.mismatches[:10]
    assert on_pvol.lost == 0, f"{on_pvol.lost} acknowledged writes are not on the P-VOL"

    wait_until(lambda: not display(secondary)["link"]["up"], 30, "the link to drop")
    assert pairctl(secondary, "takeover", check=False).returncode == 2  # SSWS
    on_svol = check_prefix(read_files(secondary), {}, writes)
    print(f"acked {on_svol.acked}, on the S-VOL {on_svol.included}, lost {on_svol.lost}")
    assert not on_svol.mismatches, f"seed {seed}: {on_svol.mismatches[:10]}"
    assert on_svol.acked >= enough
    assert on_svol.included >= restored > 0, f"restored {restored} before the kill"
