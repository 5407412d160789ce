"""The iSCSI adapter's write path: the WriteJournal calls in the NBD server's order, before
the volume changes; host access switched at run time (common.iscsi.server).

A recording journal and a real Volume (a sparse file): each journal call notes whether the
volume already holds the write's data, so "the record before the write" is checked, not
assumed. The core is driven with bytes (tests.unit.test_iscsi_core's initiator)."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from common.iscsi import scsi
from common.iscsi.pdu import Op, Pdu
from common.iscsi.server import Change, ChangeKind, HostChange, IscsiServer
from common.iscsi.target import IscsiTargetConnection
from common.nbd.iostats import OPS, HostIoStats
from common.volume import Volume
from tests.unit.test_iscsi_core import Session, data_out, scsi_cmd, sense_of

pytestmark = pytest.mark.timeout(30)

LUN_BYTES = 1 << 20
PAYLOAD = bytes(range(256)) * 16  # 4 KiB


class RecordingJournal:
    """A WriteJournal that notes each call and what LUN 0's volume held at that moment."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.calls: list[tuple[str, bool]] = []  # (call, volume holds PAYLOAD at 8 KiB)
        self.ack_delay_s = 0.0

    def _note(self, call: str) -> None:
        self.calls.append((call, self.volume.read(8192, len(PAYLOAD)) == PAYLOAD))

    def wrote(self, volume: str, offset: int, payload: bytes | memoryview) -> None:
        assert bytes(payload) == PAYLOAD
        self._note(f"wrote {volume} {offset}+{len(payload)}")

    def trimmed(self, volume: str, offset: int, length: int) -> None:
        self._note(f"trimmed {volume} {offset}+{length}")

    def zeroed(self, volume: str, offset: int, length: int) -> None:
        self._note(f"zeroed {volume} {offset}+{length}")

    def failed(self, volume: str, offset: int, length: int) -> None:
        self._note(f"failed {volume} {offset}+{length}")

    def flush_records(self) -> None:
        self._note("flush_records")

    async def sync(self) -> None:
        self._note("sync")


def write_10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return bytes((0x2A, 0x08 if fua else 0)) + struct.pack(">IBHB", lba, 0, blocks, 0)


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    opened = Volume.open_or_create("vol0", tmp_path / "vol0.img", LUN_BYTES)
    yield opened
    opened.close()


def session_on(server: IscsiServer, immediate_data: bool = True) -> Session:
    session = Session()
    session.conn = IscsiTargetConnection(server.config, tsih=9)
    session.login([("ImmediateData", "Yes" if immediate_data else "No")])
    return session


def run(server: IscsiServer, session: Session, events: list[object]) -> list[Pdu]:
    asyncio.run(server.run_events(session.conn, events))  # type: ignore[arg-type]
    return session.replies()


def test_a_write_is_journaled_and_its_records_flushed_before_the_volume_holds_it(
    volume: Volume,
) -> None:
    journal = RecordingJournal(volume)
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume], journal)
    session = session_on(server)
    events = session.send(scsi_cmd(write_10(16, 8), 1, 100, 4096, write=True, data=PAYLOAD))
    (reply,) = run(server, session, events)
    assert reply.opcode == Op.SCSI_RSP and reply.spec3 == scsi.Status.GOOD
    assert journal.calls == [("wrote vol0 8192+4096", False), ("flush_records", False)]
    assert volume.read(8192, 4096) == PAYLOAD


def test_a_fua_write_is_answered_after_the_journal_sync(volume: Volume) -> None:
    journal = RecordingJournal(volume)
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume], journal)
    session = session_on(server)
    cmd = scsi_cmd(write_10(16, 8, fua=True), 1, 100, 4096, write=True, data=PAYLOAD)
    (reply,) = run(server, session, session.send(cmd))
    assert reply.spec3 == scsi.Status.GOOD
    assert [call for call, _ in journal.calls] == ["wrote vol0 8192+4096", "flush_records", "sync"]
    assert journal.calls[-1] == ("sync", True)  # after the volume write, before the reply


def test_a_failed_volume_write_tells_the_journal_and_answers_medium_error(
    volume: Volume, tmp_path: Path
) -> None:
    journal = RecordingJournal(volume)
    broken = Volume("vol0", tmp_path / "closed.img", LUN_BYTES)  # never opened: EBADF
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [broken], journal)
    session = session_on(server)
    events = session.send(scsi_cmd(write_10(16, 8), 1, 100, 4096, write=True, data=PAYLOAD))
    (reply,) = run(server, session, events)
    assert sense_of(reply) == scsi.WRITE_ERROR
    calls = [call for call, _ in journal.calls]
    assert calls == ["wrote vol0 8192+4096", "flush_records", "failed vol0 8192+4096"]


def mode_sense_wp(server: IscsiServer, session: Session, itt: int, cmd_sn: int) -> bool:
    cdb = bytes((0x1A, 0x08, 0x3F, 0, 255, 0))  # MODE SENSE 6, no block descriptors
    session.send(scsi_cmd(cdb, itt, cmd_sn, 255, read=True))
    (reply,) = session.replies()
    return bool(reply.data[2] & 0x80)


def test_set_read_only_refuses_writes_even_one_whose_data_was_arriving(volume: Volume) -> None:
    journal = RecordingJournal(volume)
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume], journal)
    session = session_on(server, immediate_data=False)
    assert not mode_sense_wp(server, session, 1, 100)
    session.send(scsi_cmd(write_10(16, 8), 2, 101, 4096, write=True))  # accepted: an R2T
    (r2t,) = session.replies()
    assert r2t.opcode == Op.R2T

    server.set_read_only()  # e.g. the primary handing over in a takeover swap
    events = session.send(data_out(2, r2t.field32(20), 0, PAYLOAD, 0, final=True))
    (reply,) = run(server, session, events)
    assert sense_of(reply) == scsi.WRITE_PROTECTED
    assert journal.calls == [] and volume.read(8192, 4096) == bytes(4096)
    assert mode_sense_wp(server, session, 3, 102)
    session.send(scsi_cmd(write_10(16, 8), 4, 103, 4096, write=True))
    assert sense_of(session.replies()[0]) == scsi.WRITE_PROTECTED  # refused at once

    taken_over = RecordingJournal(volume)  # e.g. the secondary's bitmap marker in SSWS
    server.set_writable(taken_over)
    assert not mode_sense_wp(server, session, 5, 104)
    events = session.send(scsi_cmd(write_10(16, 8), 6, 105, 4096, write=True))
    (r2t,) = session.replies()
    events = session.send(data_out(6, r2t.field32(20), 0, PAYLOAD, 0, final=True))
    (reply,) = run(server, session, events)
    assert reply.spec3 == scsi.Status.GOOD
    assert [call for call, _ in taken_over.calls] == ["wrote vol0 8192+4096", "flush_records"]
    assert journal.calls == []


def test_a_volume_configured_read_only_stays_so_after_set_writable(volume: Volume) -> None:
    server = IscsiServer(
        "iqn.2026-01.org.journalpair:unit", [volume], None, always_read_only=["vol0"]
    )
    server.set_writable(RecordingJournal(volume))
    session = session_on(server)
    assert mode_sense_wp(server, session, 1, 100)
    session.send(scsi_cmd(write_10(0, 1), 2, 101, 512, write=True, data=bytes(512)))
    assert sense_of(session.replies()[0]) == scsi.WRITE_PROTECTED


def test_inflow_control_holds_the_reply_not_the_write(volume: Volume) -> None:
    journal = RecordingJournal(volume)
    journal.ack_delay_s = 0.05
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume], journal)
    session = session_on(server)
    events = session.send(scsi_cmd(write_10(16, 8), 1, 100, 4096, write=True, data=PAYLOAD))

    midway: list[bool] = []  # the volume holds the write while its reply is held

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        loop.call_later(0.025, lambda: midway.append(volume.read(8192, 4096) == PAYLOAD))
        await server.run_events(session.conn, events)
        return loop.time() - started

    assert asyncio.run(timed()) >= 0.05
    assert midway == [True]
    assert session.replies()[0].spec3 == scsi.Status.GOOD


def test_answered_commands_are_counted_in_the_volumes_host_io_stats(volume: Volume) -> None:
    stats = HostIoStats()  # the NBD export's, in the daemons: one series per volume
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume], stats={"vol0": stats})
    session = session_on(server)
    events = session.send(scsi_cmd(write_10(16, 8), 1, 100, 4096, write=True, data=PAYLOAD))
    read_10 = bytes((0x28, 0, 0, 0, 0, 16, 0, 0, 2, 0))
    events += session.send(scsi_cmd(read_10, 2, 101, 1024, read=True))
    events += session.send(scsi_cmd(bytes((0x35,)) + bytes(9), 3, 102, 0))
    run(server, session, events)
    counted = dict(zip(OPS, zip(stats.requests, stats.bytes, strict=True), strict=True))
    assert counted["write"] == (1, 4096) and counted["read"] == (1, 1024)
    assert counted["flush"] == (1, 0) and counted["trim"] == (0, 0)


def test_trim_and_zero_changes_take_the_same_journaled_path(volume: Volume) -> None:
    """What UNMAP / WRITE SAME will map to: one command of several changes, journaled in
    order before the volume changes, answered once through ``done``."""
    volume.write(0, b"\xff" * 65536)
    journal = RecordingJournal(volume)
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume], journal)
    answered: list[int] = []
    changes = (
        Change(ChangeKind.TRIM, 0, 16384),
        Change(ChangeKind.ZERO, 32768, 4096),
    )
    command = HostChange(7, 0, changes, fua=True, done=answered.append)
    conn = IscsiTargetConnection(server.config, tsih=9)
    asyncio.run(server.run_changes(conn, [command]))
    calls = [call for call, _ in journal.calls]
    assert calls == ["trimmed vol0 0+16384", "zeroed vol0 32768+4096", "flush_records", "sync"]
    assert answered == [7]
    assert volume.read(0, 65536) == (
        bytes(16384) + b"\xff" * 16384 + bytes(4096) + b"\xff" * (65536 - 36864)
    )
    assert volume.extents(0, 16384)[0].hole  # trimmed: deallocated
    assert not volume.extents(32768, 4096)[0].hole  # zeroed: still allocated
