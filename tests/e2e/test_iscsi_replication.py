"""iSCSI on the daemons (iscsi.listen): host writes over iSCSI go through the master journal
to the S-VOLs, and the secondary's LUNs refuse writes until a takeover makes them SSWS.

    qemu-io ─ iscsi:// ─► primaryd ─ journal ─► secondaryd ─► S-VOL == P-VOL == written
    qemu-io ─ iscsi:// ─► secondaryd (PAIR): DATA PROTECT / WRITE PROTECTED
    primaryd stopped ─► pairctl takeover (SSWS) ─► the same write succeeds
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.iscsi import scsi
from common.iscsi.pdu import Pdu
from tests.e2e.disaster import prepare_swappable_sites, role_and_state
from tests.e2e.helpers import (
    Daemon,
    Daemons,
    KiB,
    MiB,
    create_pair,
    display,
    pairctl,
    read_at,
    run,
    sha256_file,
    tcp_accepts,
    wait_caught_up,
    wait_until,
)
from tests.e2e.iscsihost import IQN, RawSession, lun_url, with_iscsi
from tests.e2e.test_iscsi_conformance import load_conformance
from tests.unit.test_iscsi_core import sense_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

VOLUMES = (("vol0", 16 * MiB), ("vol1", 8 * MiB))


def prepare_with_iscsi(daemons: Daemons, role: str, primary_port: int | None = None) -> Daemon:
    return with_iscsi(daemons.prepare(role, VOLUMES, primary_port=primary_port))


def start_iscsi_pair(daemons: Daemons) -> tuple[Daemon, Daemon]:
    primary = prepare_with_iscsi(daemons, "primary")
    primary.start()
    secondary = prepare_with_iscsi(daemons, "secondary", primary_port=primary.peer_port)
    secondary.start()
    for daemon in (primary, secondary):
        port = daemon.iscsi_port  # type: ignore[attr-defined]
        wait_until(lambda p=port: tcp_accepts(p), 15, f"{daemon.name}'s iSCSI port")
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    create_pair(primary, secondary)
    return primary, secondary


def qemu_io(url: str, *commands: str, check: bool = True, read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        argv += ["-c", command]
    proc = run([*argv, url], timeout=30, check=check)
    if check:
        assert "failed" not in proc.stdout.lower(), proc.stdout
    return proc.stdout + proc.stderr


def raw_write_10(port: int, lun: int, data: bytes) -> Pdu:
    """Log in and send one WRITE 10 at LBA 0 with its data immediate: the SCSI Response."""
    session = RawSession(port)
    try:
        return session.write(lun, 0, data)
    finally:
        session.close()


def apply(image: bytearray, offset: int, length: int, pattern: int) -> None:
    image[offset : offset + length] = bytes((pattern,)) * length


def test_iscsi_writes_on_the_primary_reach_the_s_vol_in_order(daemons: Daemons) -> None:
    primary, secondary = start_iscsi_pair(daemons)
    log = primary.log_text()
    assert f"LUN 0 vol0, LUN 1 vol1 read-write over iSCSI as {IQN}" in log, log
    # In order, overlapping: each later write covers part of the earlier ones.
    writes = {
        0: [
            (0, MiB, 0x11),
            (512 * KiB, MiB, 0x22),
            (768 * KiB, 4 * KiB, 0x33),
            (4 * MiB, 3 * MiB, 0x44),  # several R2Ts of MaxBurstLength each
            (5 * MiB, 512, 0x55),
        ],
        1: [(8 * MiB - 64 * KiB, 64 * KiB, 0x66), (8 * MiB - 65 * KiB, 2 * KiB, 0x77)],
    }
    before = display(primary)["seq"]["last"]
    expected = {}
    for lun, lun_writes in writes.items():
        name, size = VOLUMES[lun]
        image = bytearray(size)
        commands = []
        for offset, length, pattern in lun_writes:
            apply(image, offset, length, pattern)
            commands.append(f"write -P {pattern:#x} {offset} {length}")
        out = qemu_io(lun_url(primary, lun), *commands, "flush")
        assert out.count("wrote") == len(lun_writes), out
        expected[name] = bytes(image)

    last = display(primary)["seq"]["last"]
    assert last >= before + sum(len(w) for w in writes.values())  # each write journaled
    wait_until(
        lambda: display(secondary)["seq"]["applied"] >= last,
        30,
        f"the secondary to apply up to seq {last}",
        interval_s=0.05,
    )
    for name, size in VOLUMES:
        p_vol = read_at(primary.volume(name).path, 0, size)
        s_vol = read_at(secondary.volume(name).path, 0, size)
        assert p_vol == expected[name], f"{name}: the P-VOL is not what was written"
        assert s_vol == p_vol, f"{name}: the S-VOL differs from the P-VOL"


def test_the_secondarys_luns_are_write_protected_until_takeover(daemons: Daemons) -> None:
    primary, secondary = start_iscsi_pair(daemons)
    assert "read-only over iSCSI" in secondary.log_text()
    s_vol = secondary.volume("vol0").path
    before = sha256_file(s_vol)

    # qemu reads MODE SENSE's WP bit and will not open the LUN for writing
    out = qemu_io(lun_url(secondary, 0), "write -P 0x5e 0 64k", check=False)
    assert "LUN is write protected" in out, out
    qemu_io(lun_url(secondary, 0), "read -P 0 0 64k", read_only=True)  # reads are served
    # a WRITE sent anyway: CHECK CONDITION, DATA PROTECT / WRITE PROTECTED
    port = secondary.iscsi_port  # type: ignore[attr-defined]
    reply = raw_write_10(port, 0, b"\x5e" * 4096)
    assert sense_of(reply) == scsi.WRITE_PROTECTED
    assert sha256_file(s_vol) == before, "a refused write reached the S-VOL"

    primary.stop()  # the primary site is gone: the takeover is an S-VOL takeover (SSWS)
    wait_until(lambda: not display(secondary)["link"]["up"], 30, "the secondary to lose the link")
    proc = pairctl(secondary, "takeover", check=False)
    assert proc.returncode == 2, proc.stderr
    assert display(secondary)["state"] == "SSWS"

    assert scsi.Status(raw_write_10(port, 0, b"\x5f" * 4096).spec3) == scsi.Status.GOOD
    qemu_io(lun_url(secondary, 0), "write -P 0x5e 0 64k", "read -P 0x5e 0 64k", "flush")
    assert read_at(s_vol, 0, 64 * KiB) == b"\x5e" * 64 * KiB
    assert display(secondary)["bitmap"]["dirty_bytes"] >= 64 * KiB  # marked for a resync


def test_the_s_vol_passes_libiscsis_read_only_suite(daemons: Daemons, tmp_path: Path) -> None:
    """iscsi-test-cu's SCSI.ReadOnly against the secondary's LUN while PAIR: each write command
    of issue 8's set is refused with DATA PROTECT / WRITE PROTECTED, and the S-VOL untouched.

    libiscsi skips, inside its one test, the commands we do not implement (COMPARE AND WRITE,
    ORWRITE, WRITE 12, WRITE AND VERIFY): the script counts that as skipped, so
    the checks that ran are read from its log.
    """
    conformance = load_conformance()
    _, secondary = start_iscsi_pair(daemons)
    s_vol = secondary.volume("vol0").path
    before = sha256_file(s_vol)
    raw: list[str] = []
    results = conformance.run_conformance(
        lun_url(secondary, 0), selection=("SCSI.ReadOnly",), timeout_s=60, raw_output=raw
    )
    output = "".join(raw)
    (tmp_path / "iscsi-test-cu.out").write_text(output)
    assert [r.name for r in results] == ["ReadOnly.ReadOnlySBC"]
    assert "[FAILED]" not in output.split("Suite: ReadOnly", 1)[1], output
    refused = {
        command
        for command in ("WRITE10", "WRITE16", "UNMAP", "WRITESAME10", "WRITESAME16")
        if f"[OK] {command} returned CHECK_CONDITION DATA PROTECTION(0x07) WRITE_PROTECTED"
        in output
    }
    assert refused == {"WRITE10", "WRITE16", "UNMAP", "WRITESAME10", "WRITESAME16"}, output
    assert sha256_file(s_vol) == before, "a write reached the S-VOL"
    assert display(secondary)["state"] == "PAIR"


def test_a_role_swap_moves_iscsi_write_access_to_the_new_primary(daemons: Daemons) -> None:
    """takeover while the primary answers: the roles swap with the processes kept, and the
    iSCSI LUNs follow: B's become writable (and replicate to A), A's write protected."""
    a, b = prepare_swappable_sites(daemons, VOLUMES)
    for site in (a, b):
        with_iscsi(site).start()
    wait_until(lambda: display(a)["link"]["up"], 15, "the secondary to connect")
    create_pair(a, b)
    qemu_io(lun_url(a, 0), "write -P 0x11 0 1M", "flush")

    proc = pairctl(b, "takeover", check=False)
    assert proc.returncode == 1, proc.stderr  # 1: a swap takeover
    wait_until(lambda: role_and_state(b) == ("primary", "PAIR"), 30, "B to be the primary")
    wait_until(lambda: role_and_state(a) == ("secondary", "PAIR"), 30, "A to be the secondary")

    qemu_io(lun_url(b, 0), "write -P 0x22 512k 1M", "flush")
    wait_caught_up(b)
    expected = b"\x11" * (512 * KiB) + b"\x22" * MiB
    for site in (a, b):
        assert read_at(site.volume("vol0").path, 0, len(expected)) == expected, site.name
    refused = qemu_io(lun_url(a, 0), "write -P 0x33 0 4k", check=False)
    assert "write protected" in refused.lower(), refused
    assert read_at(a.volume("vol0").path, 0, 4 * KiB) == b"\x11" * (4 * KiB)
