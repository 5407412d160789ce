"""The replication link: who may connect, what a gap in the journal means, a stopped secondary.

primaryd ◄── Hello(group, generation, restored, applied) ── secondaryd
   │ another group ─► Refuse(group): logged on both sides, no pair can be created
   │ another primaryd claiming the group at the primary's address (Welcome.site_id) ─► not
   │   followed: the secondary stays paired and can still take over
   │ READ_JOURNAL from a seq already released ─► Refuse(needs_copy), never a later seq
   │ secondary stopped (SIGSTOP) ─► journal fills ─► PFUS, host writes carry on
   └ secondary restarted (SIGTERM, start) ─► resumes where it was, no second copy
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    MiB,
    create_pair,
    display,
    pairctl,
    qemu_io,
    read_at,
    sha256_file,
    wait_caught_up,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def set_config(daemon: Daemon, key: str, old: str, new: str) -> None:
    """Rewrite one line of a generated config (``key: old`` -> ``key: new``) before start."""
    text = daemon.config_path.read_text()
    line = f"{key}: {old}\n"
    assert text.count(line) == 1, f"{daemon.config_path} has no single {line!r}:\n{text}"
    daemon.config_path.write_text(text.replace(line, f"{key}: {new}\n"))


def assert_volumes_equal(primary: Daemon, secondary: Daemon) -> None:
    for name, volume in primary.volumes.items():
        mirror = secondary.volume(name)
        assert sha256_file(volume.path) == sha256_file(mirror.path), f"{name} differs"


def events(daemon: Daemon) -> list[dict[str, Any]]:
    lines = pairctl(daemon, "events").stdout.splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def told_needs_copy(secondary: Daemon) -> dict[str, Any] | None:
    """The secondary's link, once it says the primary refused it for lack of journal."""
    link = display(secondary)["link"]
    return link if "needs" in link["why"] else None


@contextlib.contextmanager
def stopped(daemon: Daemon) -> Iterator[None]:
    """SIGSTOP the daemon; SIGCONT it on the way out, whatever happened."""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if daemon.running():
            os.kill(daemon.pid, signal.SIGCONT)


def test_secondary_of_another_group_is_refused_and_says_why(daemons: Daemons) -> None:
    primary = daemons.start_primary()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port)
    set_config(secondary, "group", "jg0", "other-group")
    secondary.start()

    def refused() -> dict[str, Any] | None:
        link = display(secondary)["link"]
        return link if "primary refused" in link["why"] else None

    link = wait_until(refused, 15, "the secondary to report the primary's refusal", 0.1)
    assert link["up"] is False
    assert "group" in link["why"] and "other-group" in link["why"] and "jg0" in link["why"]
    wait_until(
        lambda: "refused secondary" in primary.log_text(), 5, "the refusal in the primary log"
    )
    refusals = [line for line in primary.log_text().splitlines() if "refused secondary" in line]
    assert any("'other-group'" in line and "'jg0'" in line for line in refusals), refusals
    assert display(primary)["link"]["up"] is False
    assert display(secondary)["group"] == "other-group"

    proc = pairctl(primary, "create", check=False)
    assert proc.returncode == 1, proc
    assert "no secondary is connected" in proc.stderr
    assert display(primary)["state"] == "SMPL"
    assert display(primary)["link"]["up"] is False


def test_a_second_primary_claiming_the_group_is_not_followed(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair()
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x5a 1M 1M")
    wait_caught_up(primary)
    primary.kill()  # the primary site is lost...
    # ...and a blank primaryd of the same group comes up at its replication address.
    intruder = daemons.prepare("primary", name="intruder")
    set_config(
        intruder,
        "  replication",
        f"127.0.0.1:{intruder.peer_port}",
        f"127.0.0.1:{primary.peer_port}",
    )
    intruder.start()

    link = wait_until(
        lambda: (lk := display(secondary)["link"])["why"].startswith("refused the primary") and lk,
        30,
        "the secondary to refuse the other primaryd",
    )
    assert "another primaryd claims group jg0" in link["why"], link
    assert display(secondary)["state"] == "PAIR"  # it did not leave the pair
    proc = pairctl(secondary, "takeover", check=False)
    assert proc.returncode == 2, proc.stderr  # SSWS: the data the pair held is there
    assert read_at(secondary.volume().path, 1 * MiB, 1 * MiB) == b"\x5a" * MiB
    assert display(intruder)["state"] == "SMPL"


def test_position_the_journal_no_longer_holds_is_needs_copy_never_a_gap(
    daemons: Daemons,
) -> None:
    primary, secondary = daemons.start_pair()
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x31 0 2M", "write -P 0x32 8M 1M")
    wait_caught_up(primary)
    seq = display(primary)["seq"]
    # The primary released its journal up to what the secondary restored: seq 1 is gone.
    assert seq["first"] > 1 and seq["first"] > seq["restored"], seq
    applied = seq["applied"]
    secondary.stop()
    svol_before = sha256_file(secondary.volume().path)

    qemu_io(primary.uri(), "write -P 0x33 1M 2M", "write -P 0x34 20M 512k")
    assert display(primary)["seq"]["last"] > applied
    shutil.rmtree(secondary.config_path.parent / "data" / "restore")
    try:
        secondary.start()
        link = wait_until(
            lambda: told_needs_copy(secondary), 15, "the secondary to say the pair needs a copy"
        )
        assert link["up"] is False, link
        # A few more retries (the backoff is bounded): nothing is pulled from a later seq.
        wait_until(
            lambda: primary.log_text().count("the pair needs a copy") >= 3,
            30,
            "the secondary to retry and be refused again",
            0.1,
        )
        shown = display(secondary)
        assert shown["seq"]["applied"] == applied, shown["seq"]
        assert shown["seq"]["restored"] == 0, f"pulled records after a gap: {shown['seq']}"
        assert sha256_file(secondary.volume().path) == svol_before, "the S-VOL changed"
        assert secondary.running(), secondary.log_tail()
    finally:
        if not secondary.running():
            secondary.kill()  # reap it: the failure above already says why it is gone


def test_host_writes_never_wait_for_a_stopped_secondary(daemons: Daemons) -> None:
    primary = daemons.prepare("primary")
    set_config(primary, "  capacity", "64MiB", "16MiB")
    primary.start()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port)
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    create_pair(primary, secondary)
    assert display(primary)["journal"]["capacity_bytes"] == 16 * MiB

    with stopped(secondary):
        writes = [f"write -P 0x{0x40 + i % 64:02x} {i}M 1M" for i in range(48)]
        started = time.monotonic()
        proc = qemu_io(primary.uri(), *writes, timeout=30)
        took = time.monotonic() - started
        assert proc.stdout.count("wrote 1048576/1048576 bytes") == 48, proc.stdout
        assert took < 20, f"48 MiB of host writes took {took:.1f} s with the secondary stopped"
        shown = display(primary)
        assert shown["state"] == "PFUS", shown
        assert "journal full" in shown["reason"], shown
        assert shown["bitmap"]["dirty_bytes"] > 0, shown

    # Resumed, the secondary learns the pair is suspended (the records it missed are in the
    # primary's bitmap now); the pair stays PFUS until an operator resyncs, never resumes
    # silently.
    wait_until(lambda: display(secondary)["state"] == "PFUS", 30, "the secondary to show PFUS", 0.1)
    assert display(secondary)["seq"]["applied"] < display(primary)["seq"]["last"]
    shown = display(primary)
    assert shown["state"] == "PFUS" and "journal full" in shown["reason"], shown
    qemu_io(primary.uri(), "write -P 0x77 50M 1M")
    assert display(primary)["state"] == "PFUS"
    pvol = primary.volume().path
    for offset, byte in ((0, 0x40), (16 * MiB, 0x50), (47 * MiB, 0x6F), (50 * MiB, 0x77)):
        assert read_at(pvol, offset, MiB) == bytes([byte]) * MiB, f"P-VOL at {offset}"
    assert [e["new"] for e in events(primary)].count("PFUS") == 1


def test_secondary_restarts_and_catches_up_without_a_new_copy(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair()
    qemu_io(primary.uri(), "write -P 0x51 0 4M")
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x52 4M 2M", "discard 1M 1M")
    wait_caught_up(primary)
    generation = display(secondary)["generation"]
    secondary.stop()

    qemu_io(primary.uri(), "write -P 0x53 2M 3M", "write -z 30M 1M", "write -P 0x54 40M 8M")
    assert display(primary)["lag"]["entries"] > 0
    secondary.start()
    wait_caught_up(primary)
    assert_volumes_equal(primary, secondary)
    assert display(secondary)["generation"] == generation
    assert display(secondary)["state"] == "PAIR"
    transitions = [(e["old"], e["new"]) for e in events(primary)]
    assert [new for _old, new in transitions].count("COPY") == 1, transitions
    assert transitions[-1] == ("COPY", "PAIR"), transitions


def test_malformed_frames_close_the_link_with_a_log_line_on_both_sides(
    daemons: Daemons,
) -> None:
    """Invariant 7 on the replication port: garbage is logged and dropped, the daemon and
    the real secondary carry on; a primary that answers garbage is logged by the secondary."""
    primary, secondary = daemons.start_pair()
    # A peer that sends a frame claiming 2 GiB, then one that sends bad msgpack.
    for junk in (struct.pack(">I", 2 << 30) + b"x" * 64, struct.pack(">I", 3) + b"\xc1\xc1\xc1"):
        with socket.create_connection(("127.0.0.1", primary.peer_port), timeout=10) as sock:
            sock.sendall(junk)
            sock.settimeout(10)
            while sock.recv(65536):  # the primary answers (Refuse) and closes
                pass
    wait_until(
        lambda: primary.log_text().count("broke the protocol") >= 2, 10, "the primary's log line"
    )
    create_pair(primary, secondary)  # the real secondary was not disturbed

    # A fake primary that answers the secondary's Hello with garbage.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        lone = daemons.prepare("secondary", name="lone", primary_port=listener.getsockname()[1])
        lone.start()
        listener.settimeout(15)
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)  # its Hello
            conn.sendall(struct.pack(">I", 4) + b"\xff\xff\xff\xff")
            wait_until(
                lambda: "broke the protocol" in lone.log_text(), 10, "the secondary's log line"
            )
    assert lone.running()
    assert display(lone)["link"]["up"] is False
