"""Role swaps: takeover while the primary answers, and resync --swap after an S-VOL takeover.

site A (starts primary)                      site B (starts secondary)
  PAIR ◄──── takeover on B: A stops host writes, B applies every one of them ────► PAIR
  A restarts as secondaryd (same pid)              B restarts as primaryd: exit code 1
  the pair runs B ─► A; no acknowledged write lost

  A killed ─► takeover on B: SSWS, hosts write B ─► A back: PSUE (it hears B is SSWS)
  resync --swap on B ─► B primary (COPY of what either site changed) ─► A its secondary
Each site's config names both addresses: listen.replication and primary: (the other's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from tests.e2e.disaster import direct, prepare_swappable_sites, role_and_state
from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import (
    HOST,
    Daemon,
    Daemons,
    create_pair,
    display,
    pairctl,
    qemu_io,
    volumes_equal,
    wait_caught_up,
    wait_state,
    wait_until,
)
from tests.e2e.test_pair_crash import Writer, assert_prefix_state, read_slots
from tests.e2e.writes import VOLUMES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def swappable_pair(
    daemons: Daemons,
    proxies: list[FaultProxy] | None = None,
    pair: Mapping[str, Any] | None = None,
) -> tuple[Daemon, Daemon]:
    """Site A (primary) and site B (secondary), each able to take the other role, started;
    with ``proxies``, B reaches A through a FaultProxy (added to it), A reaches B directly."""

    def through_proxy(port: int) -> int:
        assert proxies is not None
        proxies.append(FaultProxy(HOST, port).start())
        return proxies[-1].port

    route = through_proxy if proxies is not None else direct
    a, b = prepare_swappable_sites(daemons, VOLUMES, pair=pair, route_to_a=route)
    a.start()
    b.start()
    wait_until(lambda: display(a)["link"]["up"], 15, "the secondary to connect")
    return a, b


def test_takeover_while_the_primary_answers_swaps_roles_without_losing_a_write(
    daemons: Daemons,
) -> None:
    a, b = swappable_pair(daemons)
    create_pair(a, b)
    writer = Writer(a, seed=7)
    writer.start()
    wait_until(lambda: len(writer.acked) > 500, 60, "writes")

    proc = pairctl(b, "takeover", check=False)
    assert proc.returncode == 1, proc.stderr  # horctakeover: 1 = swap takeover
    assert "primary now" in proc.stdout
    writer.finish_after_kill()  # A closed its hosts' connections when it stopped writes
    wait_until(lambda: role_and_state(b) == ("primary", "PAIR"), 30, "B to be the primary")
    wait_until(lambda: role_and_state(a) == ("secondary", "PAIR"), 30, "A to be the secondary")
    assert a.running() and b.running(), "a role switch keeps the process (exec)"

    k = assert_prefix_state(read_slots(b), writer.acked)
    assert k == len(writer.acked) - 1, f"lost {len(writer.acked) - 1 - k} acknowledged writes"
    assert volumes_equal(a, b)

    qemu_io(b.uri("vol0"), "write -P 0x5a 1M 64k")  # the pair now runs B -> A
    wait_caught_up(b)
    assert volumes_equal(a, b)
    proc = qemu_io(a.uri("vol0"), "write -P 0x1 0 4k", check=False)
    assert proc.returncode != 0, "the old primary's volumes are read-only S-VOLs now"

    a.stop()
    a.start()  # the role persists across restarts
    assert role_and_state(a) == ("secondary", "PAIR")


def test_resync_swap_after_a_takeover_makes_the_old_primary_the_secondary(
    daemons: Daemons,
) -> None:
    a, b = swappable_pair(daemons)
    create_pair(a, b)
    qemu_io(a.uri("vol0"), "write -P 0x11 0 2M")
    wait_caught_up(a)
    a.kill()
    wait_until(lambda: not display(b)["link"]["up"], 30, "the link to drop")
    assert pairctl(b, "takeover", check=False).returncode == 2
    qemu_io(b.uri("vol0"), "write -P 0x22 4M 128k")  # production on B now
    qemu_io(b.uri("vol1"), "write -P 0x23 0 64k")

    a.start()
    wait_state(a, "PSUE", 30)  # it hears from B's Hello that B took over
    proc = pairctl(a, "resync", "--swap", check=False)
    assert proc.returncode == 1 and "run it on the secondary" in proc.stderr

    pairctl(b, "resync", "--swap")
    wait_until(lambda: role_and_state(b) == ("primary", "PAIR"), 60, "B to be the primary")
    wait_until(lambda: role_and_state(a) == ("secondary", "PAIR"), 60, "A to be the secondary")
    wait_caught_up(b)
    assert volumes_equal(a, b)
    assert display(b)["bitmap"]["dirty_bytes"] == 0
