"""Hostile bytes into the sans-I/O iSCSI target core: a valid initiator stream, mutated.

Whatever an initiator sends, the core raises nothing but RemoteProtocolError, asks only for
I/O inside the LUN, holds no more than one PDU plus the slack of one receive, and gives the
same replies however the transport splits the stream.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.iscsi import scsi
from common.iscsi.pdu import RESERVED_TAG, Op, Pdu, RemoteProtocolError, encode_pdu, pack_fields
from common.iscsi.target import (
    NEED_DATA,
    Closing,
    FlushRequest,
    IscsiTargetConnection,
    LoggedIn,
    ReadRequest,
    TargetConfig,
    UnmapRequest,
    WriteRequest,
    WriteSameRequest,
)
from common.iscsi.textkeys import TargetLimits
from tests.unit.fuzzing import mutate
from tests.unit.test_iscsi_core import (
    INITIATOR,
    IQN,
    data_out,
    login_pdu,
    parse_target_pdus,
    scsi_cmd,
)
from tests.unit.test_iscsi_provisioning import unmap_cdb, unmap_list, write_same_cdb

LUN_BYTES = 64 << 10
LIMITS = TargetLimits(max_recv_data_segment_bytes=8192, max_burst_bytes=4096)
SLACK_BYTES = 1 << 20  # what receive_data tolerates above one PDU before it calls it misuse
UNMAP_LIST = unmap_list((4, 8), (30, 2))


def valid_stream() -> bytes:
    """Login, INQUIRY, READ, a WRITE with immediate data and two R2Ts, NOP, SYNC, UNMAP,
    WRITE SAME, a TMF, a NOP-Out answering no ping, Logout.
    TTTs are handed out from 1 in order, so the Data-Out can be written in advance."""
    pdus = [
        login_pdu(
            [
                ("InitiatorName", INITIATOR),
                ("TargetName", IQN),
                ("AuthMethod", "None"),
            ],
            0,
            1,
        ),
        login_pdu([("MaxRecvDataSegmentLength", "8192"), ("ImmediateData", "Yes")], 1, 3),
        scsi_cmd(bytes((0x12, 0, 0, 0, 96, 0)), 1, 100, 96, read=True),
        scsi_cmd(bytes((0x28, 0, 0, 0, 0, 8, 0, 0, 16, 0)), 2, 101, 8192, read=True),
        scsi_cmd(
            bytes((0x2A, 0, 0, 0, 0, 4, 0, 0, 20, 0)), 3, 102, 10240, write=True, data=bytes(2048)
        ),
        data_out(3, 1, 2048, b"\x11" * 4096, 0, final=True),
        data_out(3, 2, 6144, b"\x22" * 4096, 0, final=True),
        Pdu(
            Op.NOP_OUT,
            flags=0x80,
            itt=4,
            opcode_specific=pack_fields(RESERVED_TAG, 103, 0, 0, 0, 0, 0),
            data=b"ping",
        ),
        scsi_cmd(bytes((0x35,)) + bytes(9), 5, 104, 0),
        scsi_cmd(unmap_cdb(len(UNMAP_LIST)), 7, 105, len(UNMAP_LIST), write=True, data=UNMAP_LIST),
        scsi_cmd(write_same_cdb(2, 6, 0x08), 8, 106, 512, write=True, data=b"\x33" * 512),
        Pdu(  # ABORT TASK of a task long done
            Op.TASK_MGMT_REQ,
            flags=0x81,
            immediate=True,
            itt=9,
            opcode_specific=pack_fields(2, 107, 0, 101, 0, 0, 0),
        ),
        Pdu(  # a NOP-Out answering a ping we never sent: ignored
            Op.NOP_OUT,
            flags=0x80,
            immediate=True,
            itt=RESERVED_TAG,
            opcode_specific=pack_fields(0x1234, 107, 0, 0, 0, 0, 0),
        ),
        Pdu(
            Op.LOGOUT_REQ,
            flags=0x80,
            immediate=True,
            itt=6,
            opcode_specific=pack_fields(0, 107, 0, 0, 0, 0, 0),
        ),
    ]
    return b"".join(encode_pdu(pdu) for pdu in pdus)


def drive(stream: bytes, chunk_sizes: list[int]) -> tuple[bytes, list[object]]:
    """Feed `stream` in chunks as the adapter does; run every I/O against a checking fake."""
    luns = {0: scsi.LunInfo(LUN_BYTES, serial="fuzz")}
    conn = IscsiTargetConnection(TargetConfig(IQN, luns, "127.0.0.1:3260", LIMITS), tsih=1)
    out = bytearray()
    events: list[object] = []
    at, index = 0, 0
    try:
        while at < len(stream):
            size = chunk_sizes[index % len(chunk_sizes)] if chunk_sizes else len(stream)
            index += 1
            conn.receive_data(stream[at : at + size])
            at += size
            assert conn.reader.buffered <= conn.reader.buffer_limit + size
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
                serve(conn, event)
                out += conn.data_to_send()
                if isinstance(event, Closing):
                    return bytes(out), events
            out += conn.data_to_send()
    except RemoteProtocolError as exc:
        events.append(("error", str(exc)))
    return bytes(out), events


def serve(conn: IscsiTargetConnection, event: object) -> None:
    if isinstance(event, ReadRequest):
        assert event.lun == 0 and 0 < event.length <= scsi.MAX_TRANSFER_BYTES
        assert event.offset + event.length <= LUN_BYTES
        conn.read_done(event.itt, bytes(event.length))
    elif isinstance(event, WriteRequest):
        assert event.lun == 0 and 0 < len(event.data) <= scsi.MAX_TRANSFER_BYTES
        assert event.offset + len(event.data) <= LUN_BYTES
        conn.write_done(event.itt)
    elif isinstance(event, UnmapRequest):
        assert event.lun == 0 and 0 < len(event.extents) <= scsi.MAX_UNMAP_DESCRIPTORS
        assert all(length > 0 and offset + length <= LUN_BYTES for offset, length in event.extents)
        assert sum(length for _, length in event.extents) <= scsi.MAX_UNMAP_BLOCKS * 512
        conn.write_done(event.itt)
    elif isinstance(event, WriteSameRequest):
        assert event.lun == 0 and len(event.block) == 512
        assert 0 < event.length <= scsi.MAX_WRITE_SAME_BLOCKS * 512
        assert event.offset + event.length <= LUN_BYTES
        conn.write_done(event.itt)
    elif isinstance(event, FlushRequest):
        conn.flush_done(event.itt)
    else:
        assert isinstance(event, (LoggedIn, Closing))


def test_the_valid_stream_runs_to_logout_with_every_reply() -> None:
    out, events = drive(valid_stream(), [])
    kinds = [type(event).__name__ for event in events]
    assert kinds == [
        "LoggedIn",
        "ReadRequest",
        "WriteRequest",
        "FlushRequest",
        "UnmapRequest",
        "WriteSameRequest",
        "Closing",
    ]
    write = events[2]
    assert isinstance(write, WriteRequest)
    assert write.data == bytes(2048) + b"\x11" * 4096 + b"\x22" * 4096
    assert events[4] == UnmapRequest(7, 0, ((4 * 512, 8 * 512), (30 * 512, 2 * 512)))
    assert events[5] == WriteSameRequest(8, 0, 2 * 512, 6 * 512, b"\x33" * 512)
    tmf = [pdu for pdu in parse_target_pdus(out) if pdu.opcode == Op.TASK_MGMT_RSP]
    assert [(pdu.itt, pdu.spec2) for pdu in tmf] == [(9, 1)]  # task does not exist


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_stream_raises_only_the_protocol_error(data: st.DataObject) -> None:
    stream = mutate(data.draw, valid_stream(), 64)
    drive(stream, [])


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=8),
    header=st.binary(min_size=48, max_size=48),
)
def test_replies_do_not_depend_on_how_the_stream_is_split(sizes: list[int], header: bytes) -> None:
    stream = valid_stream()
    assert drive(stream, sizes) == drive(stream, [])
    # a random BHS after a good login: only the protocol error, never a crash
    first_command = encode_pdu(scsi_cmd(bytes((0x12, 0, 0, 0, 96, 0)), 1, 100, 96, read=True))
    login = stream[: stream.index(first_command)]
    drive(login + header + bytes(64), sizes)


@settings(max_examples=200, deadline=None)
@given(plan=st.lists(st.tuples(st.sampled_from("RWSTCF"), st.integers(0, 255)), max_size=40))
def test_task_management_between_commands_and_late_io_keeps_every_promise(
    plan: list[tuple[str, int]],
) -> None:
    """READs, WRITEs, SYNCs and TMFs (any function, any referenced task) with the adapter
    answering its I/O late, in any order, or failing it: no exception, each TMF answered
    once, each task answered at most once and never after a TMF said it is gone."""
    luns = {0: scsi.LunInfo(LUN_BYTES, serial="fuzz")}
    conn = IscsiTargetConnection(TargetConfig(IQN, luns, "127.0.0.1:3260", LIMITS), tsih=1)
    login = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "None")]
    conn.receive_data(encode_pdu(login_pdu(login, 1, 3)))
    held: list[object] = []  # I/O events the adapter has not answered yet
    out = bytearray()
    itt, cmd_sn = 100, 100
    tmfs: dict[int, tuple[int, int]] = {}  # TMF ITT -> (function, Referenced Task Tag)

    def feed(pdu: Pdu) -> None:
        conn.receive_data(encode_pdu(pdu))
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, (ReadRequest, WriteRequest, FlushRequest)):
                held.append(event)

    feed(Pdu(Op.NOP_OUT, flags=0x80, immediate=True, itt=RESERVED_TAG))
    for kind, number in plan:
        itt += 1
        if kind == "R":
            feed(scsi_cmd(bytes((0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0)), itt, cmd_sn, 512, read=True))
            cmd_sn += 1
        elif kind == "W":
            write = bytes((0x2A, 0, 0, 0, 0, 2, 0, 0, 1, 0))
            feed(scsi_cmd(write, itt, cmd_sn, 512, write=True, data=bytes(512)))
            cmd_sn += 1
        elif kind == "S":
            feed(scsi_cmd(bytes((0x35,)) + bytes(9), itt, cmd_sn, 0))
            cmd_sn += 1
        elif kind == "T":
            tmfs[itt] = (number % 9, 100 + number % 40)
            fields = pack_fields(tmfs[itt][1], cmd_sn, 0, cmd_sn - 1, 0, 0, 0)
            tmf = Pdu(Op.TASK_MGMT_REQ, flags=0x80 | tmfs[itt][0], immediate=True, itt=itt)
            tmf.opcode_specific = fields
            feed(tmf)
        elif held:
            answer(conn, held.pop(number % len(held)), fail=kind == "F")
        out += conn.data_to_send()
    while held:
        answer(conn, held.pop(0), fail=False)
    out += conn.data_to_send()
    check_promises(parse_target_pdus(bytes(out)), tmfs)
    assert conn.outstanding_tasks == 0
    assert conn.held_write_bytes == 0  # every byte counted against the budget given back


def answer(conn: IscsiTargetConnection, event: object, *, fail: bool) -> None:
    assert isinstance(event, (ReadRequest, WriteRequest, FlushRequest))
    if fail:
        conn.io_failed(event.itt)
    elif isinstance(event, ReadRequest):
        conn.read_done(event.itt, bytes(event.length))
    elif isinstance(event, WriteRequest):
        conn.write_done(event.itt)
    else:
        conn.flush_done(event.itt)


def check_promises(pdus: list[Pdu], tmfs: dict[int, tuple[int, int]]) -> None:
    answered: set[int] = set()
    gone: set[int] = set()  # tasks a TMF response said are ended
    tmf_answers = 0
    for pdu in pdus:
        final = pdu.opcode == Op.SCSI_RSP or (pdu.opcode == Op.DATA_IN and pdu.flags & 0x01)
        if final:
            assert pdu.itt not in answered and pdu.itt not in gone, hex(pdu.itt)
            answered.add(pdu.itt)
        elif pdu.opcode == Op.TASK_MGMT_RSP:
            tmf_answers += 1
            function, referenced = tmfs[pdu.itt]
            if pdu.spec2 == 0 and function == 1:
                gone.add(referenced)
            elif pdu.spec2 == 0 and function in (2, 4, 5, 6):
                gone.update(range(100, pdu.itt))  # every task before it (all on LUN 0)
                gone -= answered
    assert tmf_answers == len(tmfs)
