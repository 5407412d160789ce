"""Link faults on the replication path: PSUE after path_watch_s, auto-resync, slow links.

primary ◄── FaultProxy (delay, throttle, cut, blackhole) ◄── secondary pulls through it
cut / blackhole longer than path_watch_s ─► PSUE on both sides, host writes keep succeeding
link back ─► PSUE stays (resync by the operator), or COPY ─► PAIR with pair.auto_resync
a cut shorter than path_watch_s, or a slow link ─► PAIR throughout, the S-VOL catches up
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import (
    Daemon,
    Daemons,
    MiB,
    display,
    pair_through_proxy,
    pairctl,
    qemu_io,
    transitions,
    volumes_equal,
    wait_caught_up,
    wait_state,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SIZE = 64 * MiB
PATH_WATCH_S = 2


def pair_with_path_watch(
    daemons: Daemons, proxied: list[FaultProxy], **pair: Any
) -> tuple[Daemon, Daemon, FaultProxy]:
    settings = {"path_watch_s": PATH_WATCH_S, **pair}
    return pair_through_proxy(daemons, proxied, (("vol0", SIZE),), pair=settings)


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_a_link_lost_past_path_watch_suspends_both_sides_and_resync_recovers(
    daemons: Daemons, proxied: list[FaultProxy], fault: str
) -> None:
    primary, secondary, proxy = pair_with_path_watch(daemons, proxied)
    qemu_io(primary.uri(), "write -P 0x11 0 4M")
    wait_caught_up(primary)
    getattr(proxy, fault)()
    qemu_io(primary.uri(), "write -P 0x22 4M 2M")  # journaled, never reaches the secondary
    wait_state(primary, "PSUE", 15)
    assert display(primary)["reason"].startswith("link lost: no read-journal")
    wait_state(secondary, "PSUE", 15)
    assert "no answer from the primary" in display(secondary)["reason"]
    qemu_io(primary.uri(), "write -P 0x33 8M 1M")  # host writes never fail: the bitmap
    assert display(primary)["bitmap"]["dirty_bytes"] >= 3 * MiB

    proxy.restore()
    wait_until(lambda: display(primary)["link"]["up"], 30, "the link to come back")
    assert display(primary)["state"] == "PSUE"  # no auto-resync unless configured
    pairctl(primary, "resync")
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    assert ("PAIR", "PSUE") in transitions(primary) and ("PAIR", "PSUE") in transitions(secondary)


def test_auto_resync_brings_the_pair_back_when_the_link_returns(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    primary, secondary, proxy = pair_with_path_watch(daemons, proxied, auto_resync=True)
    proxy.blackhole()
    qemu_io(primary.uri(), "write -P 0x44 0 3M")
    wait_state(primary, "PSUE", 15)
    proxy.restore()
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    events = [json.loads(line) for line in pairctl(primary, "events").stdout.splitlines()]
    assert any(e["old"] == "PSUE" and "auto-resync" in e["reason"] for e in events), events


def test_a_short_cut_and_a_slow_link_keep_the_pair(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    primary, secondary, proxy = pair_with_path_watch(daemons, proxied, path_watch_s=10)
    proxy.cut()
    qemu_io(primary.uri(), "write -P 0x55 0 2M")
    proxy.restore()  # well within path_watch_s: the secondary reconnects and catches up
    proxy.set_delay(0.05)
    proxy.set_throttle(4 * MiB)
    qemu_io(primary.uri(), "write -P 0x66 2M 4M")
    wait_caught_up(primary, 60)
    assert display(primary)["state"] == "PAIR"
    assert volumes_equal(primary, secondary)
    assert all("PSUE" not in pair for pair in transitions(primary) + transitions(secondary))
