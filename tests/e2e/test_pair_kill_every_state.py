"""SIGKILL of either daemon in every pair state: the state survives the kill, hosts keep
writing, and the documented way back to PAIR leaves the S-VOL equal to the P-VOL.

    reach STATE for real (one helper per state) ─► SIGKILL primaryd or secondaryd ─► start it
      (a) both sides display the state again (COPY resumes, PFUL may have drained to PAIR);
          a suspended primary keeps its reason and every region its bitmap marked; the
          S-VOL export is writable after the restart if and only if the state is SSWS
      (b) a host write to the P-VOL succeeds and lands in the volume file
      (c) back to PAIR the documented way: nothing (COPY, PAIR, PFUL), resync (PFUS, PSUS,
          PSUE), resync --discard-secondary once the split brain was refused (SSWS)
          ─► lag 0 ─► sha256(S-VOL) == sha256(P-VOL)

What holds a state still while a side is killed:
    COPY  the replication link throttled by a FaultProxy: both sides keep answering pairctl
          (a SIGSTOPped secondary would not), the copy lasts until the throttle is lifted
    PFUL  the secondary SIGSTOPped, so nothing drains; SIGCONT once the primary was looked at
    PFUS  the secondary SIGSTOPped while 16 MiB overflow the 8 MiB journal; SIGCONT before
          the kill, so that both sides show PFUS first
    PSUE  the link cut by a FaultProxy past path_watch_s; restored before the resync

PFUS, PSUS and SSWS are killed right after their host writes, well within the second
between two bitmap saves: the marks, and for SSWS the split brain, must come back from the
mark log. The last test pins the split brain down to a kill within a millisecond of the first
write.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import nbd
import pytest

from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import (
    HOST,
    Daemon,
    Daemons,
    KiB,
    MiB,
    close_handle,
    create_pair,
    display,
    pairctl,
    qemu_io,
    read_at,
    sha256_file,
    wait_caught_up,
    wait_state,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SIZE = 64 * MiB
REGION = 64 * KiB
SIDES = ("primary", "secondary")
SUSPENDED = ("PFUS", "PSUS", "PSUE", "SSWS")
COPY_FILL = 48 * MiB
COPY_THROTTLE = 2 * MiB  # bytes/s: the 48 MiB copy would take ~24 s, the checks take ~3 s
PATH_WATCH_S = 2
HOST_WRITE = (60 * MiB, REGION, 0x7E)  # (b): a region no state's data touches
SVOL_WRITE = (62 * MiB, REGION, 0x5D)  # the S-VOL export, writable only in SSWS


@dataclass
class Pair:
    """A primary and its secondary, maybe through a FaultProxy, maybe one of them stopped."""

    primary: Daemon
    secondary: Daemon
    proxy: FaultProxy | None = None
    stopped: Daemon | None = field(default=None, repr=False)

    def daemon(self, side: str) -> Daemon:
        return self.primary if side == "primary" else self.secondary

    def stop_secondary(self) -> None:
        """SIGSTOP: it pulls nothing and answers nothing (not even pairctl) until thaw()."""
        os.kill(self.secondary.pid, signal.SIGSTOP)
        self.stopped = self.secondary

    def thaw(self) -> None:
        if self.stopped is not None and self.stopped.running():
            os.kill(self.stopped.pid, signal.SIGCONT)
        self.stopped = None

    def kill_and_restart(self, side: str) -> None:
        victim = self.daemon(side)
        victim.kill()  # SIGKILL ends a stopped process as well
        if victim is self.stopped:
            self.stopped = None
        victim.start()

    def volumes_equal(self) -> bool:
        return sha256_file(self.primary.volume().path) == sha256_file(self.secondary.volume().path)


class Lab:
    """Starts pairs; at teardown SIGCONTs what a test stopped and closes the proxies (before
    the daemons fixture SIGTERMs the daemons: a stopped one would not exit)."""

    def __init__(self, daemons: Daemons) -> None:
        self.daemons = daemons
        self.pairs: list[Pair] = []
        self.proxies: list[FaultProxy] = []

    def start(
        self,
        *,
        journal: str = "64MiB",
        settings: Mapping[str, Any] | None = None,
        proxied: bool = False,
    ) -> Pair:
        """Both daemons started, the secondary connected (through a proxy if `proxied`), not
        paired yet; `journal` is the primary's journal capacity."""
        primary = self.daemons.prepare("primary", (("vol0", SIZE),), pair=settings)
        config = primary.config_path.read_text()
        primary.config_path.write_text(config.replace("capacity: 64MiB", f"capacity: {journal}"))
        primary.start()
        proxy, port = None, primary.peer_port
        if proxied:
            proxy = FaultProxy(HOST, primary.peer_port).start()
            self.proxies.append(proxy)
            port = proxy.port
        secondary = self.daemons.prepare(
            "secondary", (("vol0", SIZE),), primary_port=port, pair=settings
        )
        secondary.start()
        wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
        pair = Pair(primary, secondary, proxy)
        self.pairs.append(pair)
        return pair

    def close(self) -> None:
        for pair in self.pairs:
            pair.thaw()
        for proxy in self.proxies:
            proxy.close()


@pytest.fixture
def lab(daemons: Daemons) -> Iterator[Lab]:
    lab = Lab(daemons)
    try:
        yield lab
    finally:
        lab.close()


# --- reaching each state -------------------------------------------------------------------


def reach_copy(lab: Lab) -> Pair:
    pair = lab.start(proxied=True)
    assert pair.proxy is not None
    qemu_io(pair.primary.uri(), f"write -P 0x11 0 {COPY_FILL}")
    pair.proxy.set_throttle(COPY_THROTTLE)
    pairctl(pair.primary, "create")
    wait_state(pair.secondary, "COPY", 15)
    shown = display(pair.primary)
    assert shown["state"] == "COPY", shown
    assert shown["copy"]["done_bytes"] < COPY_FILL, "the copy must still be running"
    return pair


def reach_pair(lab: Lab) -> Pair:
    pair = lab.start()
    qemu_io(pair.primary.uri(), "write -P 0x22 0 2M")
    create_pair(pair.primary, pair.secondary)
    qemu_io(pair.primary.uri(), "write -P 0x23 4M 1M")
    return pair


def reach_pful(lab: Lab) -> Pair:
    """16 MiB journal, 14 MiB written while the secondary is stopped: over the 80% mark."""
    pair = lab.start(journal="16MiB")
    create_pair(pair.primary, pair.secondary)
    pair.stop_secondary()
    qemu_io(pair.primary.uri(), "write -P 0x33 0 14M")
    wait_state(pair.primary, "PFUL", 10)
    return pair  # the secondary stays stopped: see pful_shown_again


def reach_pfus(lab: Lab) -> Pair:
    """8 MiB journal, 16 MiB written while the secondary is stopped: the journal overflows."""
    pair = lab.start(journal="8MiB")
    create_pair(pair.primary, pair.secondary)
    pair.stop_secondary()
    try:
        qemu_io(pair.primary.uri(), "write -P 0x44 0 16M")
        assert display(pair.primary)["state"] == "PFUS"
    finally:
        pair.thaw()
    wait_state(pair.secondary, "PFUS", 30)
    return pair


def reach_psus(lab: Lab) -> Pair:
    pair = lab.start()
    create_pair(pair.primary, pair.secondary)
    assert "PSUS" in pairctl(pair.primary, "split").stdout
    wait_state(pair.secondary, "SSUS", 30)
    write_regions(pair.primary, [i * MiB for i in range(3)], 0x55)
    return pair  # killed right after: the marks must survive


def reach_psue(lab: Lab) -> Pair:
    pair = lab.start(settings={"path_watch_s": PATH_WATCH_S}, proxied=True)
    assert pair.proxy is not None
    create_pair(pair.primary, pair.secondary)
    pair.proxy.cut()
    qemu_io(pair.primary.uri(), "write -P 0x66 0 2M")  # journaled, never pulled: marked at PSUE
    wait_state(pair.primary, "PSUE", 15)
    wait_state(pair.secondary, "PSUE", 15)
    assert display(pair.primary)["bitmap"]["dirty_bytes"] >= 2 * MiB
    return pair


def reach_ssws(lab: Lab) -> Pair:
    """split --rw, then hosts write both sides: a split brain."""
    pair = lab.start()
    create_pair(pair.primary, pair.secondary)
    assert "SSWS" in pairctl(pair.primary, "split", "--rw").stdout
    wait_state(pair.secondary, "SSWS", 30)
    write_regions(pair.primary, [i * 2 * MiB for i in range(3)], 0x78)
    write_regions(pair.secondary, [i * 2 * MiB + MiB for i in range(3)], 0x77)
    return pair  # killed right after: both sides must still know they were written


def write_regions(daemon: Daemon, offsets: list[int], pattern: int) -> None:
    for offset in offsets:
        qemu_io(daemon.uri(), f"write -P {pattern:#x} {offset} {REGION}")


# --- after the restart: (a), and lifting what held the state ---------------------------------


def wait_shown(pair: Pair, on_primary: set[str], on_secondary: set[str]) -> None:
    for daemon, states in ((pair.primary, on_primary), (pair.secondary, on_secondary)):
        wait_until(
            lambda d=daemon, s=states: display(d)["state"] in s,  # type: ignore[misc]
            30,
            f"{daemon.name} to show {' or '.join(sorted(states))} after the restart",
            interval_s=0.1,
        )


def shown_as(primary_state: str, secondary_state: str) -> Callable[[Pair, str], None]:
    def check(pair: Pair, killed: str) -> None:
        wait_shown(pair, {primary_state}, {secondary_state})

    return check


def pful_shown_again(pair: Pair, killed: str) -> None:
    if killed == "primary":  # the secondary is still stopped: the journal cannot drain
        shown = display(pair.primary)
        assert shown["state"] == "PFUL", shown
        journal = shown["journal"]
        assert journal["used_bytes"] >= 0.8 * journal["capacity_bytes"], journal
    pair.thaw()
    wait_shown(pair, {"PFUL", "PAIR"}, {"PFUL", "PAIR"})  # draining is allowed to win


# --- back to PAIR: (c) ----------------------------------------------------------------------


def nothing_to_do(pair: Pair) -> None:
    """COPY goes on and PFUL drains by themselves."""


def copy_at_full_speed(pair: Pair) -> None:
    assert pair.proxy is not None
    pair.proxy.set_throttle(None)


def resync(pair: Pair) -> None:
    # a restarted site: the secondary reconnects with its backoff (up to 5 s), and a resync
    # needs it connected
    wait_until(lambda: display(pair.primary)["link"]["up"], 30, "the secondary to reconnect")
    pairctl(pair.primary, "resync")


def psue_resync(pair: Pair) -> None:
    assert pair.proxy is not None
    pair.proxy.restore()
    wait_until(lambda: display(pair.primary)["link"]["up"], 30, "the link to come back")
    assert display(pair.primary)["state"] == "PSUE", "no auto-resync unless configured"
    pairctl(pair.primary, "resync")


def ssws_resync(pair: Pair) -> None:
    """Both sides were written: a plain resync is refused, --discard-secondary decides."""
    wait_until(lambda: display(pair.primary)["split_brain"], 15, "the primary to see it")
    proc = pairctl(pair.primary, "resync", check=False)
    assert proc.returncode == 1 and "split brain" in proc.stderr, proc.stderr
    assert display(pair.primary)["state"] == "PSUS"
    assert display(pair.secondary)["state"] == "SSWS"
    pairctl(pair.primary, "resync", "--discard-secondary")


@dataclass(frozen=True)
class StateCase:
    reach: Callable[[Lab], Pair]
    shown_again: Callable[[Pair, str], None]  # (a); the second argument is the killed side
    back_to_pair: Callable[[Pair], None]  # (c), up to the point where PAIR comes back


CASES: dict[str, StateCase] = {
    "COPY": StateCase(reach_copy, shown_as("COPY", "COPY"), copy_at_full_speed),
    "PAIR": StateCase(reach_pair, shown_as("PAIR", "PAIR"), nothing_to_do),
    "PFUL": StateCase(reach_pful, pful_shown_again, nothing_to_do),
    "PFUS": StateCase(reach_pfus, shown_as("PFUS", "PFUS"), resync),
    "PSUS": StateCase(reach_psus, shown_as("PSUS", "SSUS"), resync),
    "PSUE": StateCase(reach_psue, shown_as("PSUE", "PSUE"), psue_resync),
    "SSWS": StateCase(reach_ssws, shown_as("PSUS", "SSWS"), ssws_resync),
}


def assert_svol_access(pair: Pair, writable: bool) -> None:
    offset, length, pattern = SVOL_WRITE
    proc = qemu_io(pair.secondary.uri(), f"write -P {pattern:#x} {offset} {length}", check=False)
    if writable:
        assert proc.returncode == 0, f"the SSWS S-VOL must stay writable: {proc.stderr}"
    else:
        assert proc.returncode != 0, "the S-VOL must stay read-only"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("state", list(CASES))
def test_sigkill_keeps_the_state_and_the_pair_comes_back_equal(
    lab: Lab, state: str, side: str
) -> None:
    case = CASES[state]
    pair = case.reach(lab)
    before = display(pair.primary)

    pair.kill_and_restart(side)
    case.shown_again(pair, side)  # (a)
    if state in SUSPENDED:
        after = display(pair.primary)
        assert after["reason"] == before["reason"]
        assert after["bitmap"]["dirty_bytes"] >= before["bitmap"]["dirty_bytes"], (
            "the kill lost marks of the difference bitmap"
        )
    assert_svol_access(pair, writable=state == "SSWS")

    offset, length, pattern = HOST_WRITE  # (b)
    qemu_io(pair.primary.uri(), f"write -P {pattern:#x} {offset} {length}")
    assert read_at(pair.primary.volume().path, offset, length) == bytes([pattern]) * length

    case.back_to_pair(pair)  # (c)
    wait_state(pair.primary, "PAIR", 90)
    wait_state(pair.secondary, "PAIR", 30)
    wait_caught_up(pair.primary)
    assert pair.volumes_equal(), "S-VOL != P-VOL after the pair came back"


# --- a split brain made a millisecond before the kill ---------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_a_split_brain_is_still_refused_after_a_kill_right_after_a_write(
    lab: Lab, side: str
) -> None:
    """The other site was written while split; the killed one had its first write acknowledged
    a millisecond before the SIGKILL. Its "written while split" must come back (from the mark
    log), or a plain resync would overwrite the secondary's writes without a decision."""
    pair = lab.start()
    create_pair(pair.primary, pair.secondary)
    pairctl(pair.primary, "split", "--rw")
    wait_state(pair.secondary, "SSWS", 30)
    victim = pair.daemon(side)
    write_regions(pair.daemon("secondary" if side == "primary" else "primary"), [MiB], 0x61)
    handle = nbd.NBD()
    try:
        handle.connect_uri(victim.uri())
        handle.pwrite(bytes([0x62]) * REGION, 3 * MiB)
        victim.kill()  # a millisecond after the ack: before the next bitmap save, but for ~0.1%
    finally:
        close_handle(handle)
    victim.start()
    assert display(victim)["bitmap"]["dirty_bytes"] >= REGION, "the mark log lost the mark"
    wait_until(lambda: display(pair.primary)["link"]["up"], 15, "the secondary to reconnect")
    # The site that was not killed notes its write within a second, and the primary hears
    # the secondary's with its next request.
    other_noted = (
        (lambda: display(pair.primary)["peer"]["written_while_split"])
        if side == "primary"
        else (lambda: display(pair.primary)["written_while_split"])
    )
    wait_until(other_noted, 15, "the site that was not killed to note its write")
    shown = display(pair.primary)
    proc = pairctl(pair.primary, "resync", check=False)
    assert proc.returncode == 1 and "split brain" in proc.stderr, (
        f"a plain resync was accepted after the {side} was killed: the split brain was "
        f"forgotten (primary written_while_split={shown['written_while_split']}, "
        f"peer={shown['peer']}); {proc.stdout.strip()}"
    )
    pairctl(pair.primary, "resync", "--discard-secondary")
    wait_state(pair.primary, "PAIR", 60)
    wait_caught_up(pair.primary)
    assert pair.volumes_equal()
