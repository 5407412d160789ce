"""What one connection may hold: write data (TargetConfig.write_buffer_bytes_max: R2Ts go
out only while the budget has room, waiting writes get theirs in arrival order as room
frees, and a write bigger than the whole budget still goes on once nothing else is held),
and READ data queued to send (the adapter sends it past SEND_BATCH_BYTES)."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path

import pytest

from common.iscsi.pdu import Op, Pdu
from common.iscsi.server import SEND_BATCH_BYTES, IscsiServer
from common.iscsi.target import IscsiTargetConnection, ReadRequest, WriteRequest
from common.volume import Volume
from tests.unit.test_iscsi_core import Session, data_out, parse_target_pdus, scsi_cmd

pytestmark = pytest.mark.timeout(30)

KiB = 1 << 10
NO_UNSOLICITED = [("ImmediateData", "No"), ("InitialR2T", "Yes")]


def budget_session(budget_bytes: int) -> Session:
    session = Session()
    config = dataclasses.replace(session.conn.config, write_buffer_bytes_max=budget_bytes)
    session.conn = IscsiTargetConnection(config, tsih=5)
    session.login(NO_UNSOLICITED)
    return session


def write_cmd(itt: int, cmd_sn: int, lba: int, nbytes: int) -> Pdu:
    cdb = bytes((0x2A, 0)) + struct.pack(">IBH", lba, 0, nbytes // 512) + bytes(1)
    return scsi_cmd(cdb, itt, cmd_sn, nbytes, write=True)


def r2ts(session: Session) -> dict[int, int]:
    """ITT -> TTT of the R2Ts sent since the last call."""
    return {pdu.itt: pdu.field32(20) for pdu in session.replies() if pdu.opcode == Op.R2T}


def test_r2ts_are_held_back_while_the_write_budget_is_taken() -> None:
    session = budget_session(64 * KiB)
    for n in range(3):  # three 32 KiB writes: room for two
        assert session.send(write_cmd(1 + n, 100 + n, 64 * n, 32 * KiB)) == []
    granted = r2ts(session)
    assert sorted(granted) == [1, 2]
    assert session.conn.held_write_bytes == 64 * KiB
    # write 1's data arrives: it is still held (the WriteRequest is not answered)
    events = session.send(data_out(1, granted[1], 0, bytes(32 * KiB), 0, final=True))
    assert [type(event) for event in events] == [WriteRequest]
    assert r2ts(session) == {} and session.conn.held_write_bytes == 64 * KiB
    session.conn.write_done(1)  # answered: room for write 3
    replies = session.replies()
    assert [(pdu.opcode, pdu.itt) for pdu in replies] == [(Op.R2T, 3), (Op.SCSI_RSP, 1)]
    assert session.conn.held_write_bytes == 64 * KiB
    ttt3 = replies[0].field32(20)
    for itt, ttt in ((2, granted[2]), (3, ttt3)):
        (event,) = session.send(data_out(itt, ttt, 0, bytes(32 * KiB), 0, final=True))
        session.conn.write_done(event.itt)
    assert session.conn.held_write_bytes == 0 and session.conn.outstanding_tasks == 0


def test_waiting_writes_get_their_r2ts_in_arrival_order() -> None:
    session = budget_session(64 * KiB)
    session.send(write_cmd(1, 100, 0, 64 * KiB))
    session.send(write_cmd(2, 101, 128, 48 * KiB))  # waits
    session.send(write_cmd(3, 102, 256, 8 * KiB))  # would fit after 2, but comes after it
    granted = r2ts(session)
    assert list(granted) == [1]
    (written,) = session.send(data_out(1, granted[1], 0, bytes(64 * KiB), 0, final=True))
    assert isinstance(written, WriteRequest)
    session.conn.write_done(1)
    assert list(r2ts(session)) == [2, 3]


def test_a_write_bigger_than_the_budget_goes_on_when_nothing_else_is_held() -> None:
    session = budget_session(16 * KiB)
    session.send(write_cmd(1, 100, 0, 64 * KiB))
    granted = r2ts(session)
    assert list(granted) == [1] and session.conn.held_write_bytes == 64 * KiB
    session.send(write_cmd(2, 101, 128, 4 * KiB))
    assert r2ts(session) == {}  # over the budget while write 1 is held
    (written,) = session.send(data_out(1, granted[1], 0, bytes(64 * KiB), 0, final=True))
    assert isinstance(written, WriteRequest) and len(written.data) == 64 * KiB
    session.conn.write_done(1)
    assert list(r2ts(session)) == [2]


def test_an_aborted_waiting_write_never_gets_an_r2t() -> None:
    session = budget_session(32 * KiB)
    session.send(write_cmd(1, 100, 0, 32 * KiB))
    session.send(write_cmd(2, 101, 64, 32 * KiB))  # waits
    granted = r2ts(session)
    abort = Pdu(Op.TASK_MGMT_REQ, flags=0x80 | 1, immediate=True, itt=9)
    abort.opcode_specific = struct.pack(">7I", 2, 102, 0, 0, 0, 0, 0)  # ABORT TASK ITT 2
    session.send(abort)
    assert [pdu.opcode for pdu in session.replies()] == [Op.TASK_MGMT_RSP]
    (written,) = session.send(data_out(1, granted[1], 0, bytes(32 * KiB), 0, final=True))
    assert isinstance(written, WriteRequest)
    session.conn.write_done(1)
    assert [pdu.itt for pdu in session.replies()] == [1]  # its response; no R2T for 2
    assert session.conn.held_write_bytes == 0 and session.conn.outstanding_tasks == 0


def test_read_data_past_the_send_batch_is_sent_before_the_next_read_runs(
    tmp_path: Path,
) -> None:
    volume = Volume.open_or_create("vol0", tmp_path / "vol0.img", 16 << 20)
    volume.write(0, bytes(range(256)) * (16 << 12))
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume])
    session = Session()
    session.conn = IscsiTargetConnection(server.config, tsih=9)
    session.login()
    mib = 1 << 20
    events = []
    for n in range(6):  # six 1 MiB READs in one receive
        cdb = bytes((0x28, 0)) + struct.pack(">IBH", n * 2048, 0, 2048) + bytes(1)
        events += session.send(scsi_cmd(cdb, 1 + n, 100 + n, mib, read=True))
    assert len(events) == 6 and all(isinstance(event, ReadRequest) for event in events)
    queued_at_send: list[int] = []
    sent = bytearray()

    async def send() -> None:
        queued_at_send.append(session.conn.bytes_to_send)
        sent.extend(session.conn.data_to_send())

    asyncio.run(server.run_events(session.conn, events, send=send))
    sent.extend(session.conn.data_to_send())
    volume.close()
    # sent as soon as more than SEND_BATCH_BYTES waited: never more than one READ beyond it
    assert len(queued_at_send) >= 2
    assert max(queued_at_send) <= SEND_BATCH_BYTES + mib + mib // 8192 * 48
    data_in = [pdu for pdu in parse_target_pdus(bytes(sent)) if pdu.opcode == Op.DATA_IN]
    assert b"".join(pdu.data for pdu in data_in) == volume_bytes(6 * mib)


def volume_bytes(length: int) -> bytes:
    return (bytes(range(256)) * (length // 256 + 1))[:length]
