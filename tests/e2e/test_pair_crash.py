"""Crashes under load: the S-VOLs are always an exact prefix of the write order (invariant 1),
and end equal to the P-VOLs; a killed primary resumes without a full copy (invariant 2).

    writer (QD1: each write after the previous one is acknowledged)
      n = 1, 2, 3 ...: block n = (n, slot, crc, payload(n)) ─► slot of vol0 or vol1
    round: SIGKILL secondaryd at a random moment ─► restart ─► SIGSTOP it at once
           read every slot of the S-VOL files: highest n found = K
           every slot must hold the last write to it among 1..K (or never written): a prefix
           SIGCONT ─► next round
    end:   writer stops ─► lag 0 ─► S-VOL files == P-VOL files
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path

import nbd
import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    close_handle,
    create_pair,
    display,
    qemu_io,
    sha256_file,
    wait_caught_up,
    wait_until,
)
from tests.e2e.writes import BLOCK, SLOTS_PER_VOLUME, VOLUMES, block, block_number, slot_location

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def parse(data: bytes, slot: int) -> int:
    """The write number a slot holds (0 = never written); a torn or foreign block fails."""
    n = block_number(data, slot)
    assert n is not None, f"slot {slot} torn"
    return n


class Writer(threading.Thread):
    """Writes blocks 1, 2, 3... to random slots, one at a time; records what was acknowledged."""

    def __init__(self, primary: Daemon, seed: int) -> None:
        super().__init__(daemon=True)
        self.primary = primary
        self.rng = random.Random(seed)
        self.acked: list[int] = [0]  # acked[n] = slot of write n
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        handles = {}
        try:
            for name, _ in VOLUMES:
                handles[name] = nbd.NBD()
                handles[name].connect_uri(self.primary.uri(name))
            n = 0
            while not self.stop.is_set():
                n += 1
                slot = self.rng.randrange(SLOTS_PER_VOLUME * 2)
                volume, offset = slot_location(slot)
                handles[volume].pwrite(block(n, slot), offset)
                self.acked.append(slot)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            for handle in handles.values():
                close_handle(handle)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        assert self.error is None, f"writer failed: {self.error!r}"

    def finish_after_kill(self) -> None:
        """The primary was killed: the writer's connection fails, which ends it."""
        self.stop.set()
        self.join(timeout=30)
        assert not self.is_alive(), "writer hung after the primary died"


def read_slots(daemon: Daemon) -> dict[int, int]:
    found = {}
    files = {name: open(daemon.volume(name).path, "rb") for name, _ in VOLUMES}  # noqa: SIM115
    try:
        for slot in range(SLOTS_PER_VOLUME * 2):
            volume, offset = slot_location(slot)
            found[slot] = parse(os.pread(files[volume].fileno(), BLOCK, offset), slot)
    finally:
        for file in files.values():
            file.close()
    return found


def assert_prefix_state(found: dict[int, int], acked: list[int]) -> int:
    """The S-VOL holds exactly writes 1..K for K = the newest write found; returns K."""
    k = max(found.values())
    last_write: dict[int, int] = {}
    for n in range(1, min(k, len(acked) - 1) + 1):
        last_write[acked[n]] = n
    assert k <= len(acked), f"the S-VOL holds write {k}, never issued"
    mixed = {slot: (n, last_write.get(slot, 0)) for slot, n in found.items()}
    mixed = {slot: pair for slot, pair in mixed.items() if pair[0] != pair[1]}
    assert not mixed, f"not a prefix state at K={k}: slot -> (found, expected) {mixed}"
    return k


def caught_up_within(primary: Daemon, entries: int) -> bool:
    shown = display(primary)
    assert shown["state"] == "PAIR", f"the pair left PAIR: {shown['state']} ({shown['reason']})"
    return bool(shown["link"]["up"]) and shown["lag"]["entries"] <= entries


def assert_volumes_equal(primary: Daemon, secondary: Daemon) -> None:
    for name, _ in VOLUMES:
        assert sha256_file(primary.volume(name).path) == sha256_file(secondary.volume(name).path), (
            f"{name}: S-VOL differs from P-VOL"
        )


def test_secondary_killed_at_random_moments_always_holds_a_prefix(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair(VOLUMES)
    create_pair(primary, secondary)
    writer = Writer(primary, seed=11)
    writer.start()
    rng = random.Random(5)
    prefixes = []
    try:
        for _ in range(8):
            # Kill at a random moment of normal operation: the secondary has caught up with
            # the writer (a restart costs it about a second of backlog).
            wait_until(lambda: len(writer.acked) > 50, 30, "the writer to get going")
            wait_until(lambda: caught_up_within(primary, 500), 60, "the secondary to catch up")
            target = len(writer.acked) + rng.randrange(20, 400)
            wait_until(lambda t=target: len(writer.acked) > t, 60, "more writes")  # type: ignore[misc]
            secondary.kill()
            secondary.start()
            os.kill(secondary.pid, signal.SIGSTOP)  # freeze it before it catches up
            try:
                prefixes.append(assert_prefix_state(read_slots(secondary), writer.acked))
            finally:
                os.kill(secondary.pid, signal.SIGCONT)
    finally:
        writer.finish()
    assert prefixes == sorted(prefixes), f"restored prefixes went backwards: {prefixes}"
    assert prefixes[-1] > 0
    wait_caught_up(primary)
    assert_prefix_state(read_slots(secondary), writer.acked)
    assert_volumes_equal(primary, secondary)


def test_primary_killed_under_load_resumes_without_a_full_copy(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair(VOLUMES)
    create_pair(primary, secondary)
    copies_before = events_into(primary, "COPY")
    for round_seed in range(3):
        writer = Writer(primary, seed=100 + round_seed)
        writer.start()
        wait_until(lambda w=writer: len(w.acked) > 300, 60, "writes")  # type: ignore[misc]
        primary.kill()  # mid-write: the last record may lack its volume write
        writer.finish_after_kill()
        primary.start()
        wait_until(lambda: display(primary)["link"]["up"], 30, "the secondary to reconnect")
    wait_caught_up(primary)
    assert display(primary)["state"] == "PAIR"
    assert events_into(primary, "COPY") == copies_before, "a restart started a new copy"
    assert primary.log_text().count("bytes journaled in") == 1, "the copy ran again"
    assert_volumes_equal(primary, secondary)


def events_into(daemon: Daemon, state: str) -> int:
    path = Path(daemon.config_path).parent / "data" / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(json.loads(line)["new"] == state for line in lines)


def test_sigterm_mid_load_stops_either_daemon_promptly_and_loses_nothing(
    daemons: Daemons,
) -> None:
    """A graceful stop while the journal flows: exit 0 within the stop timeout (a swallowed
    cancellation once kept secondaryd waiting forever), and the pair resumes where it was."""
    primary, secondary = daemons.start_pair(VOLUMES)
    create_pair(primary, secondary)
    writer = Writer(primary, seed=21)
    writer.start()
    try:
        for _ in range(3):
            wait_until(lambda: caught_up_within(primary, 500), 60, "the secondary to catch up")
            target = len(writer.acked) + 300
            wait_until(lambda t=target: len(writer.acked) > t, 60, "more writes")  # type: ignore[misc]
            secondary.stop()  # SIGTERM, exit 0 required within STOP_TIMEOUT_S
            secondary.start()
    finally:
        writer.finish()
    wait_caught_up(primary)
    assert_prefix_state(read_slots(secondary), writer.acked)
    assert_volumes_equal(primary, secondary)
    primary.stop()
    secondary.stop()


def test_primary_back_from_a_system_crash_suspends_with_every_region_marked(
    daemons: Daemons,
) -> None:
    """After a power loss the journal may miss writes that reached the P-VOL, and nothing
    says which: the pair must not carry on as if in sync. Simulated: the primary is killed
    and its "running" marker names another boot."""
    primary, secondary = daemons.start_pair(VOLUMES)
    create_pair(primary, secondary)
    qemu_io(primary.uri("vol0"), "write -P 0x61 0 1M")
    primary.kill()
    marker = Path(primary.config_path).parent / "data" / "running"
    assert marker.exists(), "a running primary keeps a marker of its boot"
    marker.write_text("00000000-0000-0000-0000-000000000000\n")  # another boot
    primary.start()
    shown = display(primary)
    assert shown["state"] == "PSUE"
    assert "system crash" in shown["reason"]
    assert shown["bitmap"]["dirty_bytes"] == sum(size for _, size in VOLUMES)
    qemu_io(primary.uri("vol0"), "write -P 0x62 0 4k")  # host writes still succeed
    primary.stop()
    assert not marker.exists(), "a clean stop removes the marker"
