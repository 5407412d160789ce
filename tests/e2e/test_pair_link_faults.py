"""Link faults at the worst moments: during COPY, during a resync, during a takeover swap and a
resync --swap; a slow link under a write burst. Hosts write the whole time (libnbd, QD1), and
every scenario ends in a documented state with the S-VOLs equal to the P-VOLs after recovery.

    hosts ─► primaryd ◄── FaultProxy (delay, throttle, cut, blackhole) ◄── secondaryd
    copy or resync, throttled so that it lasts:
        fault shorter than path_watch_s ─► the copy resumes ─► PAIR (no PSUE anywhere)
        fault longer  ─► PSUE on both sides ─► link back ─► resync ─► COPY ─► PAIR
    takeover on the secondary, the link failing before or in the middle of the swap:
        swap done (no acknowledged write lost), or refused (nothing changed), or SSWS with the
        old primary PSUE and a plain resync refused until resync --swap
    delay + throttle under a burst: PAIR or PFUL throughout, the lag drains to 0
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import (
    Daemon,
    Daemons,
    MiB,
    create_pair,
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
from tests.e2e.test_pair_crash import VOLUMES, Writer, assert_prefix_state, read_slots
from tests.e2e.test_pair_swap import role_and_state, swappable_pair

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

COPY_RATE = 8 * MiB  # bytes/s through the proxy: the 16 MiB copy lasts about 2 s
# A read-journal answer carries up to 16 MiB: on a link this slow one takes over 5 s, far
# longer than LONG_FAULT_PATH_WATCH_S, and only its bytes moving tell that the link works.
SLOW_RATE = 3 * MiB
SLOW_DELAY_S = 0.2
# The short faults run with a path watch longer than the secondary's reconnect backoff; the
# long ones with a short path watch, to be quick.
SWAP_LINK_DELAY_S = 0.5  # each way: a swap step takes a second, long enough to cut in it
SERVING_AGAIN_S = 20.0  # far below SWAP_COMMIT_S (120 s), the most a lost swap used to block
SHORT_FAULT_PATH_WATCH_S = 5.0
LONG_FAULT_PATH_WATCH_S = 1.5
FAULTS = ("cut", "blackhole")


def fill(daemon: Daemon, pattern: int) -> None:
    """Every byte of every volume written: a copy or a full resync has all of it to send."""
    for name, size in VOLUMES:
        qemu_io(daemon.uri(name), f"write -P {pattern} 0 {size}")


def copying(primary: Daemon) -> bool:
    shown = display(primary)
    assert shown["state"] == "COPY", f"the copy ended before the fault: {shown['state']}"
    return shown["copy"]["done_bytes"] > 0


def short_fault(proxy: FaultProxy, fault: str, secondary: Daemon) -> None:
    """The link fails until the secondary notices, far less than path_watch_s, then heals."""
    getattr(proxy, fault)()
    if fault == "cut":
        wait_until(lambda: not display(secondary)["link"]["up"], 10, "the secondary to see it")
    else:  # a blackhole is silent, nothing shows it: hold it for a tenth of path_watch_s
        time.sleep(SHORT_FAULT_PATH_WATCH_S / 10)
    proxy.restore()


def long_fault(proxy: FaultProxy, fault: str, primary: Daemon, secondary: Daemon) -> None:
    """The link fails past path_watch_s: both sides suspend (PSUE, link lost), then heals."""
    getattr(proxy, fault)()
    wait_state(primary, "PSUE", 20)
    wait_state(secondary, "PSUE", 20)
    assert display(primary)["reason"].startswith("link lost"), display(primary)
    assert display(secondary)["reason"].startswith("link lost"), display(secondary)
    proxy.restore()
    wait_until(lambda: display(primary)["link"]["up"], 30, "the link to come back")


def recover_and_check(primary: Daemon, secondary: Daemon, writer: Writer) -> None:
    writer.finish()
    wait_state(primary, "PAIR", 60)
    wait_caught_up(primary)
    wait_state(secondary, "PAIR", 30)
    assert volumes_equal(primary, secondary), "S-VOL differs from P-VOL"


def path_watch_s(longer_than_path_watch: bool) -> float:
    return LONG_FAULT_PATH_WATCH_S if longer_than_path_watch else SHORT_FAULT_PATH_WATCH_S


def never_suspended(*sites: Daemon) -> bool:
    return all("PSUE" not in step for site in sites for step in transitions(site))


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("longer_than_path_watch", [False, True], ids=["short", "long"])
def test_a_link_fault_during_the_initial_copy(
    daemons: Daemons, proxied: list[FaultProxy], fault: str, longer_than_path_watch: bool
) -> None:
    settings = {"path_watch_s": path_watch_s(longer_than_path_watch)}
    primary, secondary, proxy = pair_through_proxy(
        daemons, proxied, VOLUMES, pair=settings, create=False
    )
    fill(primary, 0x3C)
    proxy.set_throttle(COPY_RATE)
    writer = Writer(primary, seed=21)
    writer.start()
    pairctl(primary, "create")
    wait_until(lambda: copying(primary), 30, "the copy to be under way")
    if longer_than_path_watch:
        long_fault(proxy, fault, primary, secondary)
        pairctl(primary, "resync")
    else:
        short_fault(proxy, fault, secondary)
    recover_and_check(primary, secondary, writer)
    assert never_suspended(primary, secondary) != longer_than_path_watch


@pytest.mark.parametrize("longer_than_path_watch", [False, True], ids=["short", "long"])
def test_a_cut_during_a_resync(
    daemons: Daemons, proxied: list[FaultProxy], longer_than_path_watch: bool
) -> None:
    settings = {"path_watch_s": path_watch_s(longer_than_path_watch)}
    primary, secondary, proxy = pair_through_proxy(daemons, proxied, VOLUMES, pair=settings)
    pairctl(primary, "split")
    wait_state(secondary, "SSUS", 15)
    fill(primary, 0x5A)  # every region marked: the resync has all of it to send
    proxy.set_throttle(COPY_RATE)
    writer = Writer(primary, seed=22)
    writer.start()
    pairctl(primary, "resync")
    wait_until(lambda: copying(primary), 30, "the resync to be under way")
    if longer_than_path_watch:
        long_fault(proxy, "cut", primary, secondary)
        pairctl(primary, "resync")
    else:
        short_fault(proxy, "cut", secondary)
    recover_and_check(primary, secondary, writer)
    assert never_suspended(primary, secondary) != longer_than_path_watch


def paired_and_writing(
    daemons: Daemons, proxied: list[FaultProxy], path_watch_s: float, *, seed: int, writes: int
) -> tuple[Daemon, Daemon, Writer]:
    """A swappable pair (B through the proxy) in PAIR, hosts writing A: `writes` acknowledged."""
    a, b = swappable_pair(daemons, proxied, pair={"path_watch_s": path_watch_s})
    create_pair(a, b)
    writer = Writer(a, seed=seed)
    writer.start()
    wait_until(lambda: len(writer.acked) > writes, 30, "writes")
    return a, b, writer


def test_a_takeover_with_the_link_cut_is_ssws_and_needs_resync_swap(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    a, b, writer = paired_and_writing(
        daemons, proxied, LONG_FAULT_PATH_WATCH_S, seed=23, writes=200
    )
    proxied[-1].cut()
    wait_until(lambda: not display(b)["link"]["up"], 10, "B to see the link down")
    proc = pairctl(b, "takeover", check=False)
    assert proc.returncode == 2, proc.stderr  # the primary does not answer: SSWS
    assert display(b)["state"] == "SSWS"
    qemu_io(b.uri("vol0"), "write -P 0x77 1M 64k")  # production on B now
    wait_state(a, "PSUE", 20)  # A's hosts keep writing: both sites written, a split brain
    writer.finish()
    proxied[-1].restore()
    wait_until(lambda: display(a)["split_brain"], 30, "A to hear that B took over")
    refused = pairctl(a, "resync", check=False)
    assert refused.returncode != 0 and "split brain" in refused.stderr, refused.stderr
    pairctl(b, "resync", "--swap")
    wait_until(lambda: role_and_state(b) == ("primary", "PAIR"), 60, "B to be the primary")
    wait_until(lambda: role_and_state(a) == ("secondary", "PAIR"), 60, "A to be the secondary")
    wait_caught_up(b)
    assert volumes_equal(a, b)


def test_a_slow_link_under_a_write_burst_keeps_the_pair(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    """Answers of 16 MiB at 3 MiB/s, 200 ms each way: no complete message for seconds, yet
    bytes flow; neither path watch (1.5 s) may take that for a dead link."""
    settings = {"path_watch_s": LONG_FAULT_PATH_WATCH_S}
    primary, secondary, proxy = pair_through_proxy(daemons, proxied, VOLUMES, pair=settings)
    proxy.set_delay(SLOW_DELAY_S)
    proxy.set_throttle(SLOW_RATE)
    for pattern in (0x61, 0x62):  # 32 MiB journaled in 1 MiB writes, as hosts write
        for name, size in VOLUMES:
            writes = [f"write -P {pattern} {off} 1M" for off in range(0, size, MiB)]
            qemu_io(primary.uri(name), *writes)
    burst_last = display(primary)["seq"]["last"]

    def half_applied() -> bool:
        for site in (primary, secondary):
            shown = display(site)
            assert shown["state"] in ("PAIR", "PFUL"), (site.name, shown["state"], shown["reason"])
        return display(primary)["seq"]["applied"] >= burst_last // 2

    wait_until(half_applied, 60, "the first big answers to cross the slow link", 0.2)
    proxy.restore()
    wait_caught_up(primary, 60)
    assert never_suspended(primary, secondary)
    assert volumes_equal(primary, secondary), "S-VOL differs from P-VOL"


class InBackground(threading.Thread):
    """A pairctl call in a thread, so that the test can cut the link while it runs."""

    def __init__(self, call: Callable[[], subprocess.CompletedProcess[str]]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.proc: subprocess.CompletedProcess[str] | None = None
        self.start()

    def run(self) -> None:
        self.proc = self.call()

    def result(self) -> subprocess.CompletedProcess[str]:
        self.join(90)
        assert self.proc is not None, "the background pairctl did not finish"
        return self.proc

    def ended_early(self) -> bool:
        assert self.proc is None, f"it ended before the cut: {self.proc}"
        return False


def host_writes(daemon: Daemon) -> bool:
    return qemu_io(daemon.uri("vol1"), "write -P 0x44 2M 64k", check=False).returncode == 0


def test_a_cut_in_the_middle_of_a_takeover_leaves_the_primary_serving(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    """A has stopped host writes for the swap, the link is cut before COMMIT: the takeover
    is refused on B, A stays the primary and serves its hosts again at once (not after
    SWAP_COMMIT_S); PSUE on both; resync brings PAIR back, roles unchanged. Over the slow
    link a long poll and a round trip are 2 s of silence: the path watch must be longer."""
    a, b, writer = paired_and_writing(
        daemons, proxied, SHORT_FAULT_PATH_WATCH_S, seed=24, writes=200
    )
    proxied[-1].set_delay(SWAP_LINK_DELAY_S)
    takeover = InBackground(lambda: pairctl(b, "takeover", check=False))
    stopped = "host writes stopped"
    wait_until(lambda: stopped in a.log_text() or takeover.ended_early(), 30, "A to stop writes")
    proxied[-1].cut()
    proc = takeover.result()
    assert proc.returncode == 1, proc.stdout + proc.stderr  # refused: nothing swapped
    writer.finish_after_kill()  # A closed its hosts' connections when it stopped writes
    wait_until(lambda: host_writes(a), SERVING_AGAIN_S, "A's hosts to write again")
    assert display(b)["role"] == "secondary"
    assert not host_writes(b), "B must stay a read-only secondary"
    wait_state(a, "PSUE", 20)
    wait_state(b, "PSUE", 20)
    proxied[-1].restore()
    wait_until(lambda: display(a)["link"]["up"], 30, "the link to come back")
    pairctl(a, "resync")
    wait_state(a, "PAIR", 60)
    wait_caught_up(a)
    wait_state(b, "PAIR", 30)
    assert role_and_state(a) == ("primary", "PAIR")
    assert display(b)["role"] == "secondary"
    assert volumes_equal(a, b)


# -- a swap's last answer lost: the old primary is the secondary, the other site not yet ------

BECOMES_SECONDARY = "this site becomes the secondary"


def cut_as_a_takes_the_last_step(
    a: Daemon, b: Daemon, proxy: FaultProxy, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run pairctl `args` on B with the link slow, and cut it the moment A has switched roles:
    A's answer is still in the proxy, B never gets it."""
    proxy.set_delay(SWAP_LINK_DELAY_S)
    asked = InBackground(lambda: pairctl(b, *args, check=False))
    wait_until(lambda: BECOMES_SECONDARY in a.log_text() or asked.ended_early(), 30, "A to switch")
    proxy.cut()
    return asked.result()


def both_secondaries(a: Daemon, b: Daemon) -> None:
    """A restarts as secondaryd (no control socket for a moment); B stays the secondary."""
    wait_until(lambda: (role_and_state(a) or ("",))[0] == "secondary", 30, "A's restart")
    assert display(b)["role"] == "secondary"


def finished_by_b(a: Daemon, b: Daemon, b_state: str = "PAIR") -> None:
    """B, hearing from A that the swap took place, finishes it: B primary, A its secondary."""
    wait_until(lambda: role_and_state(b) == ("primary", b_state), 60, "B to finish the swap")
    generation = display(b)["generation"]
    wait_until(lambda: display(a)["generation"] == generation, 30, "A to join B's generation")
    wait_until(lambda: role_and_state(a) == ("secondary", "PAIR"), 60, "A to follow B")
    assert "no longer answering as the old primary" in a.log_text()


def test_a_takeover_whose_commit_answer_is_lost_is_finished_when_the_link_is_back(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    # Across the slow link, silences of about 2 s (a long poll and a round trip) must not
    # trip the path watch.
    a, b, writer = paired_and_writing(
        daemons, proxied, SHORT_FAULT_PATH_WATCH_S, seed=25, writes=2000
    )
    # Drained at full speed: the proxy carries 1 MiB per delay, too slow for a long backlog
    # (test_pair_swap covers a takeover under writes).
    writer.finish()
    wait_caught_up(a)
    proc = cut_as_a_takes_the_last_step(a, b, proxied[-1], "takeover")
    assert proc.returncode == 1 and "may have taken COMMIT" in proc.stderr, proc
    both_secondaries(a, b)  # neither site takes host writes until the link is back
    assert not host_writes(a) and not host_writes(b)
    proxied[-1].restore()
    finished_by_b(a, b)
    assert "the answer to COMMIT was lost" in display(b)["reason"]
    k = assert_prefix_state(read_slots(b), writer.acked)
    assert k == len(writer.acked) - 1, f"lost {len(writer.acked) - 1 - k} acknowledged writes"
    assert host_writes(b)
    wait_caught_up(b)
    assert volumes_equal(a, b)


def test_a_takeover_whose_commit_answer_is_lost_then_ssws_needs_resync_swap(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    """The link stays down, so the operator takes over again (SSWS) and hosts write B: once
    the link is back, B does not switch by itself (its hosts' connections would drop), and
    resync --swap makes it the primary without asking A, which is the secondary already."""
    a, b = swappable_pair(daemons, proxied, pair={"path_watch_s": LONG_FAULT_PATH_WATCH_S})
    create_pair(a, b)
    qemu_io(a.uri("vol0"), "write -P 0x31 0 1M")
    wait_caught_up(a)
    proc = cut_as_a_takes_the_last_step(a, b, proxied[-1], "takeover")
    assert proc.returncode == 1 and "may have taken COMMIT" in proc.stderr, proc
    wait_until(lambda: not display(b)["link"]["up"], 10, "B to see the link down")
    proc = pairctl(b, "takeover", check=False)
    assert proc.returncode == 2, proc.stderr  # SSWS, with every write A acknowledged
    qemu_io(b.uri("vol0"), "write -P 0x32 512k 64k")
    proxied[-1].restore()
    wait_until(
        lambda: "here makes this site the primary" in display(b)["link"]["why"],
        30,
        "B to hear from A",
    )
    assert role_and_state(b) == ("secondary", "SSWS")
    pairctl(b, "resync", "--swap")
    finished_by_b(a, b)
    wait_caught_up(b)
    assert volumes_equal(a, b)
    qemu_io(b.uri("vol0"), "read -P 0x32 512k 64k", "read -P 0x31 0 512k")  # equal to A's


def ssws_on_b(a: Daemon, b: Daemon, proxy: FaultProxy) -> None:
    """The primary site cut off, B took over (SSWS) and hosts wrote it; the link is back."""
    qemu_io(a.uri("vol0"), "write -P 0x41 0 1M")
    wait_caught_up(a)
    proxy.cut()
    wait_until(lambda: not display(b)["link"]["up"], 10, "B to see the link down")
    assert pairctl(b, "takeover", check=False).returncode == 2
    qemu_io(b.uri("vol0"), "write -P 0x42 256k 64k")
    wait_state(a, "PSUE", 20)
    proxy.restore()
    wait_until(lambda: display(b)["link"]["up"], 30, "the link to come back")


def test_a_resync_swap_whose_answer_is_lost_is_finished_when_the_link_is_back(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    a, b = swappable_pair(daemons, proxied, pair={"path_watch_s": LONG_FAULT_PATH_WATCH_S})
    create_pair(a, b)
    ssws_on_b(a, b, proxied[-1])
    proc = cut_as_a_takes_the_last_step(a, b, proxied[-1], "resync", "--swap")
    assert proc.returncode == 1 and "may have become the secondary" in proc.stderr, proc
    both_secondaries(a, b)
    assert host_writes(b), "B stays SSWS until it learns that A took the swap"
    proxied[-1].restore()
    finished_by_b(a, b)
    wait_caught_up(b)
    assert volumes_equal(a, b)


def test_a_resync_swap_whose_request_is_lost_changes_nothing(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    a, b = swappable_pair(daemons, proxied, pair={"path_watch_s": LONG_FAULT_PATH_WATCH_S})
    create_pair(a, b)
    ssws_on_b(a, b, proxied[-1])
    proxied[-1].set_delay(1.0)  # the request waits in the proxy: the cut drops it
    asked = InBackground(lambda: pairctl(b, "resync", "--swap", check=False))
    wait_until(
        lambda: "asking the primary: swap step resync" in b.log_text() or asked.ended_early(),
        30,
        "B to send its request",
    )
    proxied[-1].cut()
    proc = asked.result()
    assert proc.returncode == 1 and "the link dropped" in proc.stderr, proc
    assert BECOMES_SECONDARY not in a.log_text()
    assert role_and_state(a) == ("primary", "PSUE")
    assert role_and_state(b) == ("secondary", "SSWS")
    proxied[-1].restore()
    wait_until(lambda: display(b)["link"]["up"], 30, "the link to come back")
    pairctl(b, "resync", "--swap")  # the documented way: ask again
    wait_until(lambda: role_and_state(b) == ("primary", "PAIR"), 60, "B to be the primary")
    wait_until(lambda: role_and_state(a) == ("secondary", "PAIR"), 60, "A to follow B")
    wait_caught_up(b)
    assert volumes_equal(a, b)
