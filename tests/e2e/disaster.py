"""Fault scenarios on a pair under host load, each verified: for test_pair_disaster and
scripts/soak.py.

    site A ◄─ proxy_to[A] ◄─ B pulls when A is the primary (B's primary: is proxy_to[A])
    site B ◄─ proxy_to[B] ◄─ A pulls when B is the primary (A's primary: is proxy_to[B])
    both configs name both addresses (listen.replication, primary:), so roles can swap

    disaster (the roles alternate from round to round)
      QD1 + QD32 writers ─► primary ── random delay ── SIGKILL primary
        (some rounds: SIGKILL the secondary too, before or after, and restart it)
      takeover on the secondary ─► exit 2, SSWS ─► read its S-VOLs over its NBD export
      check_prefix (writes.py): a happens-before-closed prefix; lost writes, RPO
      hosts write the SSWS site ─► restart the old primary: PSUE (the other took over)
      resync --swap on the SSWS site ─► both PAIR, roles reversed ─► lag 0, volumes equal
    secondary_crash   SIGKILL + restart the secondary under load ─► SIGSTOP it, read its
                      files: a prefix ─► SIGCONT ─► lag 0: nothing lost, volumes equal
                      (a restart slower than path_watch_s: PSUE, documented: resync)
    short_cut         reset the link for less than path_watch_s ─► PAIR throughout
    long_cut          cut or blackhole the link past path_watch_s ─► PSUE on both sides;
                      frozen S-VOL is a prefix ─► link back, resync ─► PAIR, equal
    freeze            SIGSTOP the secondary until the primary suspends (PSUE when the link
                      is silent past path_watch_s, PFUS when the journal fills first)
                      ─► SIGCONT, resync ─► PAIR, equal

Every scenario ends with the pair in PAIR, the secondary caught up and the volumes equal, so
the next one starts from a known state; anything else raises (a failed round).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import (
    HOST,
    Daemon,
    Daemons,
    create_pair,
    display,
    free_port,
    pairctl,
    volumes_equal,
    wait_caught_up,
    wait_state,
    wait_until,
)
from tests.e2e.writes import (
    VOLUMES,
    SlotImage,
    Verdict,
    Write,
    Writers,
    baseline_of,
    check_prefix,
    read_files,
    read_nbd,
    write_numbers,
)

PATH_WATCH_S = 3.0
STATE_TIMEOUT_S = 90.0  # generous: two cores shared with other work
SCENARIOS = ("disaster", "secondary_crash", "short_cut", "long_cut", "freeze")


def direct(port: int) -> int:
    """A route with no proxy: the port itself."""
    return port


def prepare_swappable_sites(
    daemons: Daemons,
    volumes: Any = VOLUMES,
    *,
    pair: Mapping[str, Any] | None = None,
    route_to_a: Callable[[int], int] = direct,
    route_to_b: Callable[[int], int] = direct,
    names: tuple[str | None, str | None] = (None, None),
) -> tuple[Daemon, Daemon]:
    """Configs of site A (primary) and site B (secondary), each able to take the other role:
    B reaches A's replication port at ``route_to_a(port)`` (a proxy, or the port itself), A
    reaches B's at ``route_to_b(port)``; ``peer_port`` is each site's own replication port."""
    a = daemons.prepare("primary", volumes, name=names[0], pair=pair)
    b_replication = free_port()
    b = daemons.prepare(
        "secondary", volumes, name=names[1], primary_port=route_to_a(a.peer_port), pair=pair
    )
    a.config_path.write_text(
        a.config_path.read_text() + f"primary: {HOST}:{route_to_b(b_replication)}\n"
    )
    nbd_line = f"  nbd: {HOST}:{b.nbd_port}\n"
    b.config_path.write_text(
        b.config_path.read_text().replace(
            nbd_line, nbd_line + f"  replication: {HOST}:{b_replication}\n"
        )
    )
    b.peer_port = b_replication
    return a, b


def role_and_state(daemon: Daemon) -> tuple[str, str] | None:
    try:
        shown = display(daemon)
    except AssertionError:  # restarting in its new role: no control socket for a moment
        return None
    return shown["role"], shown["state"]


@dataclass
class RoundResult:
    scenario: str
    seed: int
    faults: list[str] = field(default_factory=list)
    acked: int = 0
    lost: int = 0
    rpo_s: float = 0.0
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, verdict: Verdict, when: str) -> None:
        """Count a check. ``when``: "takeover" (what is missing is lost: RPO), "frozen" (a
        secondary caught mid-way: missing is lag), "final" (after catch-up: nothing missing)."""
        self.mismatches += verdict.mismatches
        if when == "takeover":
            self.lost, self.rpo_s = verdict.lost, verdict.rpo_s
        if when == "final" and verdict.lost:
            self.mismatches.append(f"{verdict.lost} acknowledged writes missing after catch-up")

    def count(self, writes: list[Write]) -> list[Write]:
        self.acked += sum(w.ack_ns is not None for w in writes)
        return writes


class PairLab:
    """Two sites behind one FaultProxy each, paired; knows which one is the primary now."""

    def __init__(self, workdir: Path, *, path_watch_s: float = PATH_WATCH_S) -> None:
        self.daemons = Daemons(workdir)
        self.path_watch_s = path_watch_s
        self.numbers = write_numbers()
        self.proxies: dict[int, FaultProxy] = {}  # replication port -> the proxy in front
        self.stopped: Daemon | None = None

    def start(self) -> PairLab:
        def route(port: int) -> int:
            self.proxies[port] = FaultProxy(HOST, port).start()
            return self.proxies[port].port

        settings = {"path_watch_s": self.path_watch_s}
        self.primary, self.secondary = prepare_swappable_sites(
            self.daemons,
            pair=settings,
            route_to_a=route,
            route_to_b=route,
            names=("siteA", "siteB"),
        )
        self.primary.start()
        self.secondary.start()
        wait_until(lambda: display(self.primary)["link"]["up"], 30, "the secondary to connect")
        create_pair(self.primary, self.secondary, STATE_TIMEOUT_S)
        return self

    @property
    def proxy(self) -> FaultProxy:
        """The proxy the secondary pulls through now."""
        return self.proxies[self.primary.peer_port]

    def freeze(self, daemon: Daemon) -> None:
        os.kill(daemon.pid, signal.SIGSTOP)
        self.stopped = daemon

    def thaw(self) -> None:
        if self.stopped is not None and self.stopped.running():
            os.kill(self.stopped.pid, signal.SIGCONT)
        self.stopped = None

    def close(self, *, clean: bool) -> None:
        """``clean``: SIGTERM both, exit 0 required; otherwise SIGKILL (a failed round)."""
        self.thaw()
        for proxy in self.proxies.values():
            proxy.close()
        if clean:
            self.daemons.stop_all()
        else:
            for daemon in self.daemons.started:
                daemon.kill()

    def in_pair(self) -> None:
        """The end of every scenario: PAIR, lag 0, the S-VOLs hold every write, files equal."""
        wait_state(self.secondary, "PAIR", STATE_TIMEOUT_S)
        wait_caught_up(self.primary, STATE_TIMEOUT_S)
        assert volumes_equal(self.primary, self.secondary), "volumes differ after PAIR, lag 0"

    def writers(self, rng: random.Random, depths: tuple[int, ...] = (1, 32)) -> Writers:
        return Writers(self.primary, self.numbers, rng.randrange(1 << 32), depths)

    def baseline(self) -> dict[int, int]:
        return baseline_of(read_nbd(self.primary))


def wait_suspended(daemon: Daemon) -> dict[str, Any]:
    """Until ``daemon`` shows PSUE or PFUS; returns its display."""

    def suspended() -> dict[str, Any] | None:
        shown = display(daemon)
        return shown if shown["state"] in ("PSUE", "PFUS") else None

    result: dict[str, Any] = wait_until(
        suspended, STATE_TIMEOUT_S, f"{daemon.name} to suspend", interval_s=0.1
    )
    return result


def frozen_image(lab: PairLab, writers: Writers) -> tuple[SlotImage, list[Write]]:
    """SIGSTOP the secondary, take the writers' log, read its files, SIGCONT: every write
    found was applied before the log was taken, so the log names it."""
    lab.freeze(lab.secondary)
    try:
        writes = writers.snapshot()
        return read_files(lab.secondary), writes
    finally:
        lab.thaw()


def final_check(
    lab: PairLab, baseline: dict[int, int], writes: list[Write], result: RoundResult
) -> None:
    """After catch-up the secondary's exports hold every write of the round."""
    lab.in_pair()
    result.add(check_prefix(read_nbd(lab.secondary), baseline, writes), "final")


def run_for(writers: Writers, rng: random.Random, low_s: float, high_s: float) -> None:
    """Let the writers get going, then run for a random time: the fault's moment."""
    wait_until(lambda: writers.acked() >= 20, 60, "the writers to get going")
    time.sleep(rng.uniform(low_s, high_s))


def resync_under_load(lab: PairLab, writers: Writers, rng: random.Random) -> None:
    """The link is back: resync on the primary while hosts write on, then stop them."""
    wait_until(lambda: display(lab.primary)["link"]["up"], 60, "the link to come back")
    pairctl(lab.primary, "resync")
    run_for(writers, rng, 0.1, 0.5)
    writers.finish()


# --- scenarios ------------------------------------------------------------------------------


def disaster(lab: PairLab, rng: random.Random, result: RoundResult) -> None:
    disaster_round(lab, rng, result, rng.choice([None, None, "before", "after"]))


def disaster_round(
    lab: PairLab, rng: random.Random, result: RoundResult, also_secondary: str | None
) -> None:
    """``also_secondary``: None, or "before" / "after": SIGKILL the secondary too, then."""
    old, new = lab.primary, lab.secondary
    baseline = lab.baseline()
    with lab.writers(rng) as writers:
        run_for(writers, rng, 0.2, 2.5)
        if also_secondary == "before":
            new.kill()
            time.sleep(rng.uniform(0, 0.5))
        old.kill()
        result.faults.append("primary_kill")
        writers.finish_after_kill()
    if also_secondary == "after":
        time.sleep(rng.uniform(0, 0.5))
        new.kill()
    if also_secondary:
        result.faults.append(f"secondary_kill_{also_secondary}")
        new.start()
    wait_until(lambda: not display(new)["link"]["up"], 30, "the secondary to lose the link")
    takeover = pairctl(new, "takeover", check=False)
    assert takeover.returncode == 2, f"takeover exit {takeover.returncode}: {takeover.stderr}"
    writes = result.count(writers.snapshot())
    result.add(check_prefix(read_nbd(new), baseline, writes), "takeover")
    swap_back(lab, rng, result)


def swap_back(lab: PairLab, rng: random.Random, result: RoundResult) -> None:
    """Hosts write the SSWS site, the old primary returns (PSUE), resync --swap there."""
    old, new = lab.primary, lab.secondary
    with Writers(new, lab.numbers, rng.randrange(1 << 32), (1,)) as production:
        wait_until(lambda: production.acked() >= 50, 60, "writes to the SSWS site")
        production.finish()
    old.start()
    wait_state(old, "PSUE", STATE_TIMEOUT_S)
    pairctl(new, "resync", "--swap")
    wait_until(lambda: role_and_state(new) == ("primary", "PAIR"), STATE_TIMEOUT_S, "new primary")
    wait_until(lambda: role_and_state(old) == ("secondary", "PAIR"), STATE_TIMEOUT_S, "new S-VOL")
    lab.primary, lab.secondary = new, old
    lab.in_pair()


def secondary_crash(lab: PairLab, rng: random.Random, result: RoundResult) -> None:
    baseline = lab.baseline()
    with lab.writers(rng) as writers:
        run_for(writers, rng, 0.2, 2.0)
        lab.secondary.kill()
        result.faults.append("secondary_kill")
        lab.secondary.start()
        image, writes = frozen_image(lab, writers)
        result.add(check_prefix(image, baseline, writes), "frozen")
        if settled(lab) == "PAIR":
            run_for(writers, rng, 0.1, 0.5)
            writers.finish()
        else:  # the restart (and the frozen read) outlasted path_watch_s on a busy machine
            shown = wait_suspended(lab.secondary)
            result.notes.append(f"the secondary restarted too slowly: {shown['state']}, resync")
            resync_under_load(lab, writers, rng)
    final_check(lab, baseline, result.count(writers.snapshot()), result)


def settled(lab: PairLab) -> str:
    """Until the primary is PAIR with the secondary pulling and caught up to a few
    thousand entries (path watch cannot fire any more), or suspended; returns the state."""

    def state() -> str | None:
        shown = display(lab.primary)
        if shown["state"] in ("PSUE", "PFUS"):
            return str(shown["state"])
        caught_up = shown["link"]["up"] and shown["lag"]["entries"] <= 2000
        return "PAIR" if shown["state"] == "PAIR" and caught_up else None

    result: str = wait_until(state, STATE_TIMEOUT_S, "the secondary to catch up", 0.1)
    return result


def short_cut(lab: PairLab, rng: random.Random, result: RoundResult) -> None:
    baseline = lab.baseline()
    with lab.writers(rng) as writers:
        run_for(writers, rng, 0.2, 1.0)
        lab.proxy.cut()
        result.faults.append("link_cut_short")
        time.sleep(rng.uniform(0.05, lab.path_watch_s / 4))  # the fault's length
        lab.proxy.restore()
        run_for(writers, rng, 0.2, 0.5)
        writers.finish()
    final_check(lab, baseline, result.count(writers.snapshot()), result)
    for daemon in (lab.primary, lab.secondary):
        shown = display(daemon)["state"]
        assert shown == "PAIR", f"{daemon.name} is {shown} after a cut shorter than path watch"


def long_cut(lab: PairLab, rng: random.Random, result: RoundResult) -> None:
    fault = rng.choice(["cut", "blackhole"])
    baseline = lab.baseline()
    with lab.writers(rng) as writers:
        run_for(writers, rng, 0.2, 1.0)
        getattr(lab.proxy, fault)()
        result.faults.append(f"link_{fault}_long")
        # PSUE past path_watch_s, or PFUS if the writers fill the journal first
        shown = wait_suspended(lab.primary)
        result.notes.append(f"{shown['state']}: {shown['reason']}")
        wait_suspended(lab.secondary)
        image, writes = frozen_image(lab, writers)
        result.add(check_prefix(image, baseline, writes), "frozen")
        lab.proxy.restore()
        resync_under_load(lab, writers, rng)
    final_check(lab, baseline, result.count(writers.snapshot()), result)


def freeze(lab: PairLab, rng: random.Random, result: RoundResult) -> None:
    baseline = lab.baseline()
    with lab.writers(rng) as writers:
        run_for(writers, rng, 0.2, 1.0)
        lab.freeze(lab.secondary)
        result.faults.append("secondary_sigstop")
        shown = wait_suspended(lab.primary)
        result.notes.append(f"{shown['state']}: {shown['reason']}")
        lab.thaw()
        wait_suspended(lab.secondary)
        resync_under_load(lab, writers, rng)
    final_check(lab, baseline, result.count(writers.snapshot()), result)


RUNNERS: dict[str, Callable[[PairLab, random.Random, RoundResult], None]] = {
    "disaster": disaster,
    "secondary_crash": secondary_crash,
    "short_cut": short_cut,
    "long_cut": long_cut,
    "freeze": freeze,
}


def run_round(lab: PairLab, scenario: str, seed: int) -> RoundResult:
    """One scenario with its own seed; raises when the pair does not come back."""
    result = RoundResult(scenario, seed)
    try:
        RUNNERS[scenario](lab, random.Random(seed), result)
    finally:
        lab.thaw()
    return result
