"""Thin provisioning in the sans-I/O iSCSI core: UNMAP, WRITE SAME (10, 16), the VPD pages and
READ CAPACITY (16) bits that advertise them, and the adapter's bounded WRITE SAME writer."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from common.iscsi import scsi
from common.iscsi.pdu import LocalProtocolError, Op
from common.iscsi.server import WRITE_SAME_CHUNK_BYTES, IscsiServer, host_change, repeated_block
from common.iscsi.target import UnmapRequest, WriteRequest, WriteSameRequest
from common.iscsi.textkeys import TargetLimits
from common.volume import Volume
from tests.unit.test_iscsi_core import LUN_BYTES, Session, data_out, scsi_cmd, sense_of

pytestmark = pytest.mark.timeout(30)

BLOCKS = LUN_BYTES // 512
LUN = {0: scsi.LunInfo(LUN_BYTES, serial="thin")}
BIG_BLOCKS = 2 * scsi.MAX_WRITE_SAME_BLOCKS  # a LUN on which the WRITE SAME limit is reached


def unmap_cdb(list_bytes: int, anchor: bool = False) -> bytes:
    return bytes((0x42, int(anchor), 0, 0, 0, 0, 0)) + struct.pack(">H", list_bytes) + bytes(1)


def unmap_list(*descriptors: tuple[int, int], extra: bytes = b"") -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, blocks) for lba, blocks in descriptors) + extra
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def write_same_cdb(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((0x93, flags)) + struct.pack(">QI", lba, blocks) + bytes(2)


def write_same_10_cdb(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((0x41, flags)) + struct.pack(">IBHB", lba, 0, blocks, 0)


def inquiry_vpd(page: int) -> bytes:
    reply = scsi.execute(bytes((0x12, 1, page, 1, 0, 0)), 0, LUN)
    assert isinstance(reply, scsi.Reply) and reply.status == scsi.Status.GOOD
    assert (
        reply.data[1] == page and struct.unpack_from(">H", reply.data, 2)[0] == len(reply.data) - 4
    )
    return reply.data


def unmap_session(**kwargs: bool) -> Session:
    session = Session(**kwargs)
    session.login([("ImmediateData", "Yes")])
    return session


# -- what the LUN advertises --------------------------------------------------------------


def test_vpd_pages_and_read_capacity_16_advertise_a_thin_lun_and_its_limits() -> None:
    assert list(inquiry_vpd(0x00)[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    limits = inquiry_vpd(0xB0)
    assert len(limits) == 64 and limits[4] & 0x01 == 0  # WSNZ 0: zero blocks is "to the end"
    max_transfer, _, _, max_unmap, max_descriptors, granularity, alignment = struct.unpack_from(
        ">7I", limits, 8
    )
    assert max_transfer * 512 == scsi.MAX_TRANSFER_BYTES
    assert (max_unmap, max_descriptors) == (scsi.MAX_UNMAP_BLOCKS, scsi.MAX_UNMAP_DESCRIPTORS)
    assert granularity * 512 == 4096 and alignment == 0x80000000  # UGAVALID, aligned at 0
    assert struct.unpack_from(">Q", limits, 36)[0] == scsi.MAX_WRITE_SAME_BLOCKS
    characteristics = inquiry_vpd(0xB1)
    assert len(characteristics) == 64 and characteristics[4:6] == b"\x00\x01"  # non-rotating
    provisioning = inquiry_vpd(0xB2)
    assert provisioning[5] & 0xE0 == 0xE0  # LBPU, LBPWS, LBPWS10
    assert (provisioning[5] >> 2) & 0x07 == 1  # LBPRZ: an unmapped block reads zeros
    assert provisioning[5] & 0x02 == 0  # ANC_SUP: no anchored LBAs
    assert provisioning[6] & 0x07 == 2  # thin provisioned
    reply = scsi.execute(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2), 0, LUN)
    assert isinstance(reply, scsi.Reply) and len(reply.data) == 32
    assert reply.data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ


# -- UNMAP --------------------------------------------------------------------------------


def test_unmap_descriptors_become_one_event_of_byte_extents() -> None:
    session = unmap_session()
    params = unmap_list((8, 16), (100, 0), (BLOCKS - 1, 1))
    events = session.send(
        scsi_cmd(unmap_cdb(len(params)), 5, 100, len(params), write=True, data=params)
    )
    assert events == [UnmapRequest(5, 0, ((8 * 512, 16 * 512), ((BLOCKS - 1) * 512, 512)))]
    assert session.replies() == []  # nothing answered before the adapter is done
    session.conn.write_done(5)
    (reply,) = session.replies()
    assert reply.opcode == Op.SCSI_RSP and reply.spec3 == scsi.Status.GOOD


def test_an_unmap_parameter_list_can_come_by_r2t_and_an_incomplete_descriptor_is_ignored() -> None:
    session = Session()
    session.login([("ImmediateData", "No")])
    params = unmap_list((0, 4), extra=bytes(10))
    assert session.send(scsi_cmd(unmap_cdb(len(params)), 5, 100, len(params), write=True)) == []
    (r2t,) = session.replies()
    assert r2t.opcode == Op.R2T and r2t.field32(44) == len(params)
    events = session.send(data_out(5, r2t.field32(20), 0, params, 0, final=True))
    assert events == [UnmapRequest(5, 0, ((0, 4 * 512),))]


def test_an_unmap_with_nothing_to_unmap_answers_good_without_an_event() -> None:
    session = unmap_session()
    assert session.send(scsi_cmd(unmap_cdb(0), 1, 100, 0)) == []  # no parameter list
    params = unmap_list((BLOCKS, 0), (3, 0))  # zero blocks, even at the end of the LUN
    assert (
        session.send(scsi_cmd(unmap_cdb(len(params)), 2, 101, len(params), write=True, data=params))
        == []
    )
    assert [reply.spec3 for reply in session.replies()] == [scsi.Status.GOOD] * 2
    assert session.conn.outstanding_tasks == 0


@pytest.mark.parametrize(
    ("params", "sense"),
    [
        (unmap_list((BLOCKS - 1, 2)), scsi.LBA_OUT_OF_RANGE),
        (unmap_list((0, 1), (1 << 63, 1)), scsi.LBA_OUT_OF_RANGE),
        (
            unmap_list(*[(n, 1) for n in range(scsi.MAX_UNMAP_DESCRIPTORS + 1)]),
            scsi.INVALID_FIELD_IN_PARAMETER_LIST,
        ),
        (unmap_list((0, 4))[:6], scsi.PARAMETER_LIST_LENGTH_ERROR),
    ],
)
def test_a_bad_unmap_parameter_list_answers_its_sense(
    params: bytes, sense: tuple[int, int, int]
) -> None:
    session = unmap_session()
    assert (
        session.send(scsi_cmd(unmap_cdb(len(params)), 1, 100, len(params), write=True, data=params))
        == []
    )
    assert sense_of(session.replies()[0]) == sense
    assert session.conn.outstanding_tasks == 0


def test_an_unmap_over_the_advertised_lba_count_is_an_invalid_parameter_list() -> None:
    big = scsi.LunInfo(4 * scsi.MAX_UNMAP_BLOCKS * 512, serial="big")
    io = scsi.Io(scsi.IoKind.UNMAP, length=40)
    half = scsi.MAX_UNMAP_BLOCKS // 2
    at_limit = scsi.parameters_received(io, unmap_list((0, half), (half, half)), big)
    assert at_limit == scsi.Unmap(((0, half * 512), (half * 512, half * 512)))
    over = scsi.parameters_received(io, unmap_list((0, half), (half, half + 1)), big)
    assert over == scsi.check_condition(scsi.INVALID_FIELD_IN_PARAMETER_LIST)


def test_parameters_of_a_command_that_has_none_are_our_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        scsi.parameters_received(scsi.Io(scsi.IoKind.READ, 0, 512), bytes(512), LUN[0])


def test_unmap_with_anchor_or_on_a_read_only_lun_is_refused_before_its_data() -> None:
    session = unmap_session()
    session.send(
        scsi_cmd(unmap_cdb(24, anchor=True), 1, 100, 24, write=True, data=unmap_list((0, 1)))
    )
    assert sense_of(session.replies()[0]) == scsi.INVALID_FIELD_IN_CDB
    session = unmap_session(read_only=True)
    session.send(scsi_cmd(unmap_cdb(24), 1, 100, 24, write=True, data=unmap_list((0, 1))))
    assert sense_of(session.replies()[0]) == scsi.WRITE_PROTECTED


def test_a_failed_unmap_answers_a_write_error_and_only_once() -> None:
    session = unmap_session()
    params = unmap_list((0, 1))
    session.send(scsi_cmd(unmap_cdb(len(params)), 1, 100, len(params), write=True, data=params))
    session.conn.io_failed(1)
    assert sense_of(session.replies()[0]) == scsi.WRITE_ERROR
    with pytest.raises(LocalProtocolError):
        session.conn.write_done(1)


# -- WRITE SAME ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "block", "event"),
    [
        (0x08, bytes(512), UnmapRequest(1, 0, ((16 * 512, 8 * 512),))),
        (0x00, bytes(512), WriteSameRequest(1, 0, 16 * 512, 8 * 512, bytes(512))),
        # with UNMAP, a block that is not zeros is written: unmapped blocks would read zeros
        (0x08, b"\x5a" * 512, WriteSameRequest(1, 0, 16 * 512, 8 * 512, b"\x5a" * 512)),
    ],
)
def test_write_same_becomes_an_unmap_a_zeroing_or_a_repeated_write(
    flags: int, block: bytes, event: UnmapRequest | WriteSameRequest
) -> None:
    session = unmap_session()
    for cmd_sn, cdb in enumerate((write_same_cdb(16, 8, flags), write_same_10_cdb(16, 8, flags))):
        events = session.send(scsi_cmd(cdb, 1, 100 + cmd_sn, 512, write=True, data=block))
        assert events == [event]
        if isinstance(event, WriteSameRequest):
            assert event.zeros == (block == bytes(512))
        session.conn.write_done(1)
        (reply,) = session.replies()
        assert reply.spec3 == scsi.Status.GOOD and reply.flags & 0x06 == 0  # no residual


def test_write_same_of_zero_blocks_runs_to_the_last_lba_within_the_limit() -> None:
    session = unmap_session()
    lba = BLOCKS - 5
    events = session.send(
        scsi_cmd(write_same_cdb(lba, 0, 0x08), 1, 100, 512, write=True, data=bytes(512))
    )
    assert events == [UnmapRequest(1, 0, ((lba * 512, 5 * 512),))]
    big = {0: scsi.LunInfo((scsi.MAX_WRITE_SAME_BLOCKS + 1) * 512, serial="big")}
    over = scsi.execute(write_same_cdb(0, 0), 0, big)
    assert over == scsi.check_condition(scsi.INVALID_FIELD_IN_CDB)
    assert isinstance(scsi.execute(write_same_cdb(1, 0), 0, big), scsi.Io)


@pytest.mark.parametrize(
    ("cdb", "sense"),
    [
        (write_same_cdb(BIG_BLOCKS - 1, 2), scsi.LBA_OUT_OF_RANGE),
        (write_same_cdb(BIG_BLOCKS, 0), scsi.LBA_OUT_OF_RANGE),
        (write_same_cdb((1 << 64) - 1, 1), scsi.LBA_OUT_OF_RANGE),
        (write_same_cdb(0, scsi.MAX_WRITE_SAME_BLOCKS + 1), scsi.INVALID_FIELD_IN_CDB),
        (write_same_cdb(0, 1, 0x10), scsi.INVALID_FIELD_IN_CDB),  # ANCHOR
        (write_same_cdb(0, 1, 0x18), scsi.INVALID_FIELD_IN_CDB),  # ANCHOR with UNMAP
        (write_same_10_cdb(0, 1, 0x01), scsi.INVALID_FIELD_IN_CDB),  # reserved (NDOB in 16)
        (write_same_cdb(0, 1, 0x20), scsi.INVALID_FIELD_IN_CDB),  # WRPROTECT
        (write_same_cdb(0, 1, 0x02), scsi.INVALID_FIELD_IN_CDB),  # the obsolete LBDATA
        (write_same_10_cdb(BIG_BLOCKS - 1, 2), scsi.LBA_OUT_OF_RANGE),
        (write_same_10_cdb(0, scsi.MAX_WRITE_SAME_BLOCKS + 1), scsi.INVALID_FIELD_IN_CDB),
        (write_same_10_cdb(0, 1, 0x10), scsi.INVALID_FIELD_IN_CDB),  # ANCHOR
    ],
)
def test_a_bad_write_same_answers_its_sense(cdb: bytes, sense: tuple[int, int, int]) -> None:
    session = Session(lun_bytes=BIG_BLOCKS * 512)
    session.login([("ImmediateData", "Yes")])
    assert session.send(scsi_cmd(cdb, 1, 100, 512, write=True, data=bytes(512))) == []
    assert sense_of(session.replies()[0]) == sense
    assert session.conn.outstanding_tasks == 0


@pytest.mark.parametrize("edtl", [256, 1024, 0])
def test_write_same_takes_exactly_one_block_of_data_out(edtl: int) -> None:
    session = unmap_session()
    data = b"\x01" * min(edtl, 512)
    assert (
        session.send(scsi_cmd(write_same_cdb(0, 4), 1, 100, edtl, write=edtl > 0, data=data)) == []
    )
    assert sense_of(session.replies()[0]) == scsi.INVALID_FIELD_IN_CDB
    assert session.conn.outstanding_tasks == 0


@pytest.mark.parametrize(
    ("cdb", "event"),
    [
        (write_same_cdb(4, 2, 0x09), UnmapRequest(1, 0, ((2048, 1024),))),  # NDOB, UNMAP
        (write_same_cdb(4, 2, 0x01), WriteSameRequest(1, 0, 2048, 1024, bytes(512))),  # NDOB
        # UNMAP and no block, as before NDOB existed (SBC-3): a block of zeros is meant
        (write_same_cdb(4, 2, 0x08), UnmapRequest(1, 0, ((2048, 1024),))),
    ],
)
def test_write_same_without_a_block_means_a_block_of_zeros(
    cdb: bytes, event: UnmapRequest | WriteSameRequest
) -> None:
    session = unmap_session()
    assert session.send(scsi_cmd(cdb, 1, 100, 0, write=True)) == [event]
    session.conn.write_done(1)
    assert session.replies()[0].spec3 == scsi.Status.GOOD


def test_write_same_with_ndob_and_a_block_is_refused() -> None:
    session = unmap_session()
    cdb = write_same_cdb(4, 2, 0x01)
    assert session.send(scsi_cmd(cdb, 1, 100, 512, write=True, data=bytes(512))) == []
    assert sense_of(session.replies()[0]) == scsi.INVALID_FIELD_IN_CDB
    assert session.conn.outstanding_tasks == 0


def test_write_same_on_a_read_only_lun_is_write_protected() -> None:
    session = unmap_session(read_only=True)
    session.send(scsi_cmd(write_same_cdb(0, 4), 1, 100, 512, write=True, data=bytes(512)))
    assert sense_of(session.replies()[0]) == scsi.WRITE_PROTECTED


def test_a_write_is_still_a_write_event_after_a_write_same() -> None:
    session = Session(TargetLimits(first_burst_bytes=4096))
    session.login([("ImmediateData", "Yes")])
    session.send(scsi_cmd(write_same_cdb(0, 4), 1, 100, 512, write=True, data=b"\x07" * 512))
    session.conn.write_done(1)
    write = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0))
    events = session.send(scsi_cmd(write, 2, 101, 512, write=True, data=b"\x08" * 512))
    assert events == [WriteRequest(2, 0, 0, b"\x08" * 512, fua=False)]


# -- the adapter's writer -----------------------------------------------------------------


def test_a_patterned_write_same_is_the_block_repeated_in_bounded_pieces() -> None:
    block = bytes(range(256)) * 2
    length = WRITE_SAME_CHUNK_BYTES * 2 + 3 * 512
    pieces = list(repeated_block(512, length, block))
    assert max(len(data) for _, data in pieces) <= WRITE_SAME_CHUNK_BYTES
    assert [at for at, _ in pieces] == [512, 512 + WRITE_SAME_CHUNK_BYTES, 512 + 2 * (1 << 20)]
    assert b"".join(data for _, data in pieces) == block * (length // 512)
    assert pieces[0][1] is pieces[1][1]  # the full pieces share one buffer


def test_the_adapter_punches_an_unmap_and_answers_a_failed_one_with_a_write_error(
    tmp_path: Path,
) -> None:
    volume = Volume.open_or_create("v", tmp_path / "v.img", LUN_BYTES)
    volume.write(0, b"\x77" * LUN_BYTES)
    session = unmap_session()
    server = IscsiServer("iqn.2026-01.org.journalpair:unit", [volume])
    params = unmap_list((0, 64))  # 32 KiB: whole file system blocks

    def unmap(itt: int, cmd_sn: int) -> None:
        """An UNMAP of ``params`` through the core, then the adapter's one journaled path."""
        (event,) = session.send(
            scsi_cmd(unmap_cdb(len(params)), itt, cmd_sn, len(params), write=True, data=params)
        )
        assert isinstance(event, UnmapRequest)
        change = host_change(session.conn, event)
        assert change is not None
        asyncio.run(server.run_changes(session.conn, [change]))

    unmap(1, 100)
    assert session.replies()[0].spec3 == scsi.Status.GOOD
    assert volume.read(0, 64 * 512) == bytes(64 * 512)
    assert os.lseek(volume.fd, 0, os.SEEK_DATA) >= 64 * 512  # a hole, not written zeros
    volume.close()  # every call on it now fails (EBADF)
    unmap(2, 101)
    assert sense_of(session.replies()[0]) == scsi.WRITE_ERROR
