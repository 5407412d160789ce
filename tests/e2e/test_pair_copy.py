"""A pair on one machine: create (initial copy), update copy, refusals, display and wait.

primaryd ◄── READ_JOURNAL ── secondaryd        both real processes on 127.0.0.1
   ▲ qemu-io / libnbd writes                   S-VOL files compared with the P-VOL files
"""

from __future__ import annotations

import random
import threading

import nbd
import pytest

from tests.e2e.helpers import (
    Daemons,
    MiB,
    allocated_bytes,
    close_handle,
    create_pair,
    display,
    pairctl,
    qemu_io,
    sha256_file,
    wait_caught_up,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

VOLUMES = (("vol0", 64 * MiB), ("vol1", 16 * MiB))


def assert_volumes_equal(primary_daemon: object, secondary_daemon: object) -> None:
    for name, volume in primary_daemon.volumes.items():  # type: ignore[attr-defined]
        mirror = secondary_daemon.volumes[name]  # type: ignore[attr-defined]
        assert sha256_file(volume.path) == sha256_file(mirror.path), f"{name} differs"


def test_create_copies_data_keeps_holes_and_replicates_later_writes(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair(VOLUMES)
    qemu_io(primary.uri("vol0"), "write -P 0x11 1M 3M", "write -P 0x22 40M 512k")
    qemu_io(primary.uri("vol1"), "write -P 0x33 0 1M")
    create_pair(primary, secondary)
    qemu_io(primary.uri("vol0"), "write -P 0x44 2M 64k", "discard 40M 512k", "write -z 10M 1M")
    qemu_io(primary.uri("vol1"), "write -P 0x55 8M 4k")
    shown = wait_caught_up(primary)
    assert shown["lag"] == {"entries": 0, "bytes": 0, "seconds": 0.0}
    assert_volumes_equal(primary, secondary)
    # Holes stay holes: the S-VOL is no fuller than the P-VOL (plus a little slack).
    for name in ("vol0", "vol1"):
        assert allocated_bytes(secondary.volume(name).path) <= (
            allocated_bytes(primary.volume(name).path) + MiB
        )


def test_host_writes_during_the_copy_win_over_base_data(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", 64 * MiB),))
    qemu_io(primary.uri(), "write -P 0x77 0 64M")  # every region has data to copy
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        handle = nbd.NBD()
        handle.connect_uri(primary.uri())
        rng = random.Random(3)
        try:
            while not stop.is_set():
                offset = rng.randrange(0, 64 * MiB // 4096) * 4096
                handle.pwrite(rng.randbytes(4096), offset)
                written.append(offset)
        finally:
            close_handle(handle)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        pairctl(primary, "create")
        wait_until(lambda: display(primary)["state"] == "PAIR", 60, "PAIR", interval_s=0.1)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert len(written) > 100, "the writer barely ran during the copy"
    wait_caught_up(primary)
    assert_volumes_equal(primary, secondary)


def test_secondary_export_is_read_only_while_paired(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", 64 * MiB),))
    create_pair(primary, secondary)
    proc = qemu_io(secondary.uri(), "write -P 0x1 0 4k", check=False)
    assert proc.returncode != 0 or "Operation not permitted" in proc.stdout + proc.stderr


def test_create_refused_when_a_volume_size_differs(daemons: Daemons) -> None:
    primary = daemons.start_primary((("vol0", 64 * MiB),))
    secondary = daemons.prepare("secondary", (("vol0", 32 * MiB),), primary_port=primary.peer_port)
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    proc = pairctl(primary, "create", check=False)
    assert proc.returncode == 1
    assert "vol0" in proc.stderr and str(64 * MiB) in proc.stderr and str(32 * MiB) in proc.stderr
    assert display(primary)["state"] == "SMPL"


def test_create_refused_when_no_secondary_is_connected(daemons: Daemons) -> None:
    primary = daemons.start_primary()
    proc = pairctl(primary, "create", check=False)
    assert proc.returncode == 1
    assert "no secondary is connected" in proc.stderr
    assert display(primary)["state"] == "SMPL"


def test_display_json_fields_on_both_sides(daemons: Daemons) -> None:
    primary, secondary = daemons.start_pair((("vol0", 64 * MiB),))
    create_pair(primary, secondary)
    for daemon, role in ((primary, "primary"), (secondary, "secondary")):
        proc = pairctl(daemon, "wait", "PAIR", "--timeout", "10", check=False)
        assert proc.returncode == 0, proc.stderr
        shown = display(daemon)
        assert shown["role"] == role and shown["group"] == "jg0" and shown["state"] == "PAIR"
        assert shown["volumes"] == [
            {"name": "vol0", "size": 64 * MiB, "path": str(daemon.volume().path)}
        ]
        assert set(shown["lag"]) == {"entries", "bytes", "seconds"}
        assert shown["journal"]["capacity_bytes"] == 64 * MiB
        assert isinstance(shown["reason"], str) and shown["reason"]


def test_wait_times_out_with_a_reason_and_nonzero_exit(daemons: Daemons) -> None:
    primary = daemons.start_primary()
    proc = pairctl(primary, "wait", "PAIR", "--timeout", "0.5", check=False)
    assert proc.returncode == 1
    assert "SMPL" in proc.stderr and "PAIR" in proc.stderr
