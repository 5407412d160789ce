"""The sans-I/O iSCSI core driven with bytes: PDU framing, digests, login, SCSI, limits."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from common.iscsi import scsi
from common.iscsi.pdu import (
    BHS_BYTES,
    RESERVED_TAG,
    DigestError,
    LocalProtocolError,
    Op,
    Pdu,
    PduReader,
    RemoteProtocolError,
    decode_bhs,
    digest,
    encode_pdu,
    pack_fields,
    pad4,
)
from common.iscsi.target import (
    NEED_DATA,
    Closing,
    Event,
    FlushRequest,
    IscsiTargetConnection,
    LoggedIn,
    ReadRequest,
    TargetConfig,
    WriteRequest,
)
from common.iscsi.textkeys import Negotiator, TargetLimits, encode_text, parse_text

pytestmark = pytest.mark.timeout(30)

IQN = "iqn.2026-01.org.journalpair:unit"
INITIATOR = "iqn.2026-01.org.example:host"
ISID = bytes.fromhex("800000000001")
LUN_BYTES = 1 << 20


# -- an initiator made of bytes -----------------------------------------------------------


def login_pdu(
    pairs: Sequence[tuple[str, str]],
    csg: int,
    nsg: int | None,
    *,
    cont: bool = False,
    tsih: int = 0,
    version_min: int = 0,
) -> Pdu:
    flags = (csg << 2) | ((0x80 | nsg) if nsg is not None else 0) | (0x40 if cont else 0)
    return Pdu(
        Op.LOGIN_REQ,
        flags=flags,
        immediate=True,
        spec3=version_min,
        lun_or_isid=ISID + struct.pack(">H", tsih),
        itt=7,
        opcode_specific=pack_fields(0, 100, 50, 0, 0, 0, 0),
        data=encode_text(pairs),
    )


def scsi_cmd(
    cdb: bytes,
    itt: int,
    cmd_sn: int,
    edtl: int,
    *,
    read: bool = False,
    write: bool = False,
    lun: int = 0,
    data: bytes = b"",
) -> Pdu:
    flags = 0x80 | (0x40 if read else 0) | (0x20 if write else 0)
    cdb16 = cdb + bytes(16 - len(cdb))
    fields = struct.pack(">III", edtl, cmd_sn, 0) + cdb16
    return Pdu(
        Op.SCSI_CMD,
        flags=flags,
        lun_or_isid=scsi.encode_lun(lun),
        itt=itt,
        opcode_specific=fields,
        data=data,
    )


def data_out(itt: int, ttt: int, offset: int, data: bytes, data_sn: int, final: bool) -> Pdu:
    return Pdu(
        Op.DATA_OUT,
        flags=0x80 if final else 0,
        itt=itt,
        opcode_specific=pack_fields(ttt, 0, 0, 0, data_sn, offset, 0),
        data=data,
    )


def parse_target_pdus(
    data: bytes, header_digest: bool = False, data_digest: bool = False
) -> list[Pdu]:
    pdus = []
    at = 0
    while at < len(data):
        pdu, ahs, length = decode_bhs(data[at : at + BHS_BYTES])
        at += BHS_BYTES + ahs
        if header_digest:
            assert data[at : at + 4] == digest(data[at - BHS_BYTES - ahs : at])
            at += 4
        padded = length + pad4(length)
        pdu.data = data[at : at + length]
        if data_digest and length:
            assert data[at + padded : at + padded + 4] == digest(data[at : at + padded])
            at += 4
        at += padded
        pdus.append(pdu)
    assert at == len(data)
    return pdus


class Session:
    """A target connection with helpers to send PDUs and collect what comes back."""

    def __init__(
        self,
        limits: TargetLimits | None = None,
        read_only: bool = False,
        lun_bytes: int = LUN_BYTES,
    ) -> None:
        luns = {0: scsi.LunInfo(lun_bytes, serial="unit0", read_only=read_only)}
        config = TargetConfig(IQN, luns, portal="127.0.0.1:3260", limits=limits or TargetLimits())
        self.conn = IscsiTargetConnection(config, tsih=5)
        self.digests = (False, False)

    def send(self, pdu: Pdu, *, bytewise: bool = False) -> list[Event]:
        raw = encode_pdu(pdu, header_digest=self.digests[0], data_digest=self.digests[1])
        events: list[Event] = []
        chunks = [raw[i : i + 1] for i in range(len(raw))] if bytewise else [raw]
        for chunk in chunks:
            self.conn.receive_data(chunk)
            while (event := self.conn.next_event()) is not NEED_DATA:
                assert not isinstance(event, type(NEED_DATA))
                events.append(event)
        return events

    def replies(self) -> list[Pdu]:
        return parse_target_pdus(self.conn.data_to_send(), *self.digests)

    def login(self, extra: Sequence[tuple[str, str]] = ()) -> list[Pdu]:
        names = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Normal")]
        self.send(login_pdu([*names, ("AuthMethod", "None")], 0, 1))
        first = self.replies()
        events = self.send(login_pdu([("MaxRecvDataSegmentLength", "8192"), *extra], 1, 3))
        assert any(isinstance(event, LoggedIn) for event in events)
        params = self.conn.params
        self.digests = (params.header_digest, params.data_digest)
        return first + parse_target_pdus(self.conn.data_to_send())


def status_of(pdu: Pdu) -> tuple[int, int]:
    return pdu.opcode_specific[16], pdu.opcode_specific[17]


def sense_of(pdu: Pdu) -> tuple[int, int, int]:
    assert pdu.opcode == Op.SCSI_RSP and pdu.spec3 == scsi.Status.CHECK_CONDITION
    length = struct.unpack_from(">H", pdu.data)[0]
    sense = pdu.data[2 : 2 + length]
    return sense[2] & 0x0F, sense[12], sense[13]


# -- PDU framing and digests --------------------------------------------------------------


def test_bhs_round_trip_keeps_every_field_and_pads_data_to_4_bytes() -> None:
    pdu = Pdu(
        Op.SCSI_CMD,
        flags=0xA1,
        immediate=True,
        spec2=2,
        spec3=3,
        lun_or_isid=bytes(range(8)),
        itt=0x12345678,
        opcode_specific=bytes(range(100, 128)),
        data=b"hello",
    )
    raw = encode_pdu(pdu)
    assert len(raw) == BHS_BYTES + 8 and raw[-3:] == bytes(3)
    reader = PduReader()
    reader.feed(raw)
    back = reader.next_pdu()
    assert back == pdu
    assert reader.buffered == 0


def test_crc32c_digest_is_the_castagnoli_check_value_little_endian() -> None:
    assert digest(b"123456789") == (0xE3069283).to_bytes(4, "little")


def test_reader_frames_a_pdu_fed_one_byte_at_a_time_with_ahs_skipped() -> None:
    pdu = Pdu(Op.NOP_OUT, flags=0x80, itt=9, data=b"ping!!", ahs=b"AHS-1234")
    raw = encode_pdu(pdu, header_digest=True, data_digest=True)
    reader = PduReader()
    reader.header_digest = reader.data_digest = True
    got = [reader.next_pdu() for _ in range(0)]
    for i, byte in enumerate(raw):
        reader.feed(bytes((byte,)))
        got.append(reader.next_pdu())
        assert (got[-1] is None) == (i < len(raw) - 1)
    assert got[-1] is not None and got[-1].data == b"ping!!" and got[-1].itt == 9


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_corrupted_digest_raises_digest_error(where: str) -> None:
    raw = bytearray(encode_pdu(Pdu(Op.NOP_OUT, data=b"abcd"), header_digest=True, data_digest=True))
    raw[10 if where == "header" else BHS_BYTES + 4 + 1] ^= 0x01
    reader = PduReader()
    reader.header_digest = reader.data_digest = True
    reader.feed(raw)
    with pytest.raises(DigestError):
        reader.next_pdu()


def test_a_data_segment_over_max_recv_is_refused_before_its_data_arrives() -> None:
    header = Pdu(Op.NOP_OUT, data=bytes(9000)).bhs()
    reader = PduReader(max_data_bytes=8192)
    reader.feed(header)
    with pytest.raises(RemoteProtocolError, match="MaxRecvDataSegmentLength"):
        reader.next_pdu()
    assert reader.buffer_limit < 8192 + 2048


def test_a_target_opcode_from_the_initiator_is_a_protocol_error() -> None:
    reader = PduReader()
    reader.feed(encode_pdu(Pdu(Op.SCSI_RSP)))
    with pytest.raises(RemoteProtocolError, match="not an initiator opcode"):
        reader.next_pdu()


# -- text keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"A=1", b"novalue\0", b"=x\0", b"A=1\0A=2\0", b"K" * 64 + b"=1\0", b"\xff=1\0"],
)
def test_malformed_text_keys_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_text(data)


def test_negotiation_follows_each_keys_rule() -> None:
    negotiator = Negotiator(TargetLimits(max_burst_bytes=65536, first_burst_bytes=16384))
    reply = dict(
        negotiator.answer(
            [
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "4096"),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "No"),
                ("DataPDUInOrder", "No"),
                ("MaxConnections", "8"),
                ("MaxOutstandingR2T", "4"),
                ("DefaultTime2Wait", "0"),
                ("DefaultTime2Retain", "60"),
                ("ErrorRecoveryLevel", "2"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("X-vendor-key", "1"),
            ]
        )
    )
    assert reply == {
        "HeaderDigest": "CRC32C",  # the initiator's first choice
        "DataDigest": "None",
        "MaxBurstLength": "65536",  # min
        "FirstBurstLength": "4096",  # min
        "ImmediateData": "Yes",  # AND
        "InitialR2T": "No",  # OR: both said No
        "DataPDUInOrder": "No",  # AND
        "MaxConnections": "1",
        "MaxOutstandingR2T": "1",
        "DefaultTime2Wait": "2",  # max
        "DefaultTime2Retain": "0",  # min
        "ErrorRecoveryLevel": "0",
        "X-vendor-key": "NotUnderstood",
    }
    params = negotiator.params
    assert params.header_digest and not params.data_digest
    assert params.initiator_recv_data_segment_bytes == 65536
    assert negotiator.own_declarations() == [("MaxRecvDataSegmentLength", str(256 << 10))]
    assert negotiator.own_declarations() == []  # declared once


@pytest.mark.parametrize(
    "pair",
    [
        ("MaxBurstLength", "100"),
        ("MaxRecvDataSegmentLength", "16777216"),
        ("ImmediateData", "Maybe"),
        ("HeaderDigest", "MD5"),
        ("SessionType", "Other"),
        ("FirstBurstLength", "lots"),
    ],
)
def test_out_of_range_or_unsupported_values_are_protocol_errors(pair: tuple[str, str]) -> None:
    with pytest.raises(RemoteProtocolError):
        Negotiator(TargetLimits()).answer([pair])


def test_a_target_preferring_crc32c_picks_it_when_offered_second() -> None:
    negotiator = Negotiator(TargetLimits(prefer_crc32c=True))
    assert negotiator.answer([("HeaderDigest", "None,CRC32C")]) == [("HeaderDigest", "CRC32C")]


# -- login --------------------------------------------------------------------------------


def test_login_security_then_operational_then_full_feature() -> None:
    session = Session()
    first, second = session.login()
    assert first.opcode == Op.LOGIN_RSP and status_of(first) == (0, 0)
    assert first.flags == 0x80 | (0 << 2) | 1  # T, CSG security, NSG operational
    first_keys = dict(parse_text(first.data))
    assert first_keys["AuthMethod"] == "None" and first_keys["TargetPortalGroupTag"] == "1"
    assert first.lun_or_isid[6:8] == b"\0\0"  # no TSIH before the last response
    assert second.flags == 0x80 | (1 << 2) | 3
    assert second.lun_or_isid == ISID + struct.pack(">H", 5)
    assert dict(parse_text(second.data))["MaxRecvDataSegmentLength"] == str(256 << 10)
    # StatSN starts at the initiator's ExpStatSN (50); ExpCmdSN is the login's CmdSN (100)
    assert (first.field32(24), second.field32(24)) == (50, 51)
    window = session.conn.config.cmd_window
    assert second.field32(28) == 100 and second.field32(32) == 100 + window - 1


def test_login_text_spread_over_continuation_pdus_is_joined() -> None:
    session = Session()
    text = encode_text([("InitiatorName", INITIATOR), ("TargetName", IQN)])
    first = login_pdu([], 1, None, cont=True)
    first.data = text[:10]
    session.send(first)
    ack = session.replies()
    assert len(ack) == 1 and ack[0].data == b"" and status_of(ack[0]) == (0, 0)
    rest = login_pdu([], 1, 3)
    rest.data = text[10:]
    events = session.send(rest)
    assert [type(event) for event in events] == [LoggedIn]


@pytest.mark.parametrize(
    ("pairs", "status"),
    [
        ([("InitiatorName", INITIATOR), ("TargetName", "iqn.other")], (2, 3)),
        ([("TargetName", IQN)], (2, 7)),
        ([("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP")], (2, 1)),
        ([("InitiatorName", INITIATOR), ("MaxBurstLength", "1")], (2, 0)),
    ],
)
def test_a_refused_login_answers_the_status_and_closes(
    pairs: list[tuple[str, str]], status: tuple[int, int]
) -> None:
    session = Session()
    events = session.send(login_pdu(pairs, 0, 1))
    (reply,) = session.replies()
    assert status_of(reply) == status
    assert [type(event) for event in events] == [Closing]


def test_session_reinstatement_and_a_newer_version_are_refused() -> None:
    session = Session()
    session.send(login_pdu([("InitiatorName", INITIATOR)], 0, 1, tsih=3))
    assert status_of(session.replies()[0]) == (2, 0x0A)
    session = Session()
    session.send(login_pdu([("InitiatorName", INITIATOR)], 0, 1, version_min=1))
    assert status_of(session.replies()[0]) == (2, 5)


def test_a_scsi_command_before_login_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="before login"):
        Session().send(scsi_cmd(bytes(6), 1, 0, 0))


def test_discovery_session_answers_send_targets() -> None:
    session = Session()
    names = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]
    session.send(login_pdu(names, 1, 3))
    session.replies()
    text = Pdu(
        Op.TEXT_REQ,
        flags=0x80,
        itt=11,
        opcode_specific=pack_fields(RESERVED_TAG, 100, 0, 0, 0, 0, 0),
        data=encode_text([("SendTargets", "All")]),
    )
    session.send(text)
    (reply,) = session.replies()
    assert reply.opcode == Op.TEXT_RSP and reply.itt == 11
    assert parse_text(reply.data) == [("TargetName", IQN), ("TargetAddress", "127.0.0.1:3260,1")]
    session.send(scsi_cmd(bytes(6), 12, 101, 0))
    assert session.replies()[0].opcode == Op.REJECT  # no SCSI in a discovery session


# -- SCSI ---------------------------------------------------------------------------------


def test_inquiry_answers_in_one_data_in_with_status() -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(bytes((0x12, 0, 0, 0, 96, 0)), 1, 100, 96, read=True))
    (reply,) = session.replies()
    assert reply.opcode == Op.DATA_IN and reply.flags & 0x81 == 0x81  # F and S
    assert reply.data[8:16] == scsi.VENDOR and len(reply.data) == 66
    assert reply.data[58:66] == scsi.VERSION_DESCRIPTORS
    assert reply.flags & 0x02 and reply.field32(44) == 30  # underflow residual


@pytest.mark.parametrize(
    ("cdb", "edtl", "sense"),
    [
        (bytes((0x28, 0, 0, 0, 0x08, 0, 0, 0, 1, 0)), 512, scsi.LBA_OUT_OF_RANGE),
        (bytes((0x12, 0, 0x80, 0, 36, 0)), 36, scsi.INVALID_FIELD_IN_CDB),
        (bytes((0x12, 1, 0x99, 0, 36, 0)), 36, scsi.INVALID_FIELD_IN_CDB),
        (bytes((0xC7,)) + bytes(15), 0, scsi.INVALID_OPCODE),
        (bytes((0x1A, 0, 0x3F | 0xC0, 0, 255, 0)), 255, scsi.SAVING_NOT_SUPPORTED),
        (bytes((0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0)), 512, scsi.INVALID_FIELD_IN_CDB),
    ],
)
def test_errors_answer_check_condition_with_sense(
    cdb: bytes, edtl: int, sense: tuple[int, int, int]
) -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(cdb, 1, 100, edtl, read=edtl > 0))
    (reply,) = session.replies()
    assert sense_of(reply) == sense


def test_a_write_to_a_read_only_lun_is_data_protect() -> None:
    session = Session(read_only=True)
    session.login()
    session.send(scsi_cmd(bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)), 1, 100, 512, write=True))
    assert sense_of(session.replies()[0]) == scsi.WRITE_PROTECTED


def test_a_read_becomes_an_event_and_its_data_is_split_to_the_initiators_limit() -> None:
    session = Session()
    session.login()  # MaxRecvDataSegmentLength 8192 declared by the initiator
    events = session.send(
        scsi_cmd(bytes((0x28, 0, 0, 0, 0, 4, 0, 0, 40, 0)), 3, 100, 20480, read=True)
    )
    assert events == [ReadRequest(3, 0, 4 * 512, 40 * 512)]
    session.conn.read_done(3, bytes(range(256)) * 80)
    pdus = session.replies()
    assert [len(p.data) for p in pdus] == [8192, 8192, 4096]
    assert [p.field32(40) for p in pdus] == [0, 8192, 16384]  # buffer offsets
    assert [p.field32(36) for p in pdus] == [0, 1, 2]  # DataSN
    assert [p.flags & 0x81 for p in pdus] == [0, 0, 0x81]
    assert b"".join(p.data for p in pdus) == bytes(range(256)) * 80


def test_data_in_ends_each_max_burst_with_the_f_bit() -> None:
    session = Session(TargetLimits(max_burst_bytes=16384))
    session.login([("MaxBurstLength", "16384")])
    session.send(scsi_cmd(bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 64, 0)), 3, 100, 32768, read=True))
    session.conn.read_done(3, bytes(32768))
    pdus = session.replies()
    assert [p.flags & 0x81 for p in pdus] == [0, 0x80, 0, 0x81]


def test_a_write_takes_immediate_data_then_r2t_and_data_out() -> None:
    session = Session(TargetLimits(first_burst_bytes=4096, max_burst_bytes=8192))
    session.login([("ImmediateData", "Yes"), ("FirstBurstLength", "4096")])
    payload = bytes((i * 7) & 0xFF for i in range(20480))
    cdb = bytes((0x8A, 0x08)) + struct.pack(">QI", 8, 40) + bytes(2)  # WRITE 16, FUA
    assert session.send(scsi_cmd(cdb, 4, 100, 20480, write=True, data=payload[:4096])) == []
    (r2t,) = session.replies()
    assert r2t.opcode == Op.R2T and r2t.field32(40) == 4096 and r2t.field32(44) == 8192
    ttt = r2t.field32(20)
    session.send(data_out(4, ttt, 4096, payload[4096:8192], 0, final=False))
    assert session.send(data_out(4, ttt, 8192, payload[8192:12288], 1, final=True)) == []
    (r2t,) = session.replies()
    assert r2t.field32(40) == 12288 and r2t.field32(44) == 8192 and r2t.field32(36) == 1
    events = session.send(data_out(4, r2t.field32(20), 12288, payload[12288:], 0, final=True))
    assert events == [WriteRequest(4, 0, 8 * 512, payload, fua=True)]
    session.conn.write_done(4)
    (reply,) = session.replies()
    assert reply.opcode == Op.SCSI_RSP and reply.spec3 == 0 and reply.flags == 0x80


@pytest.mark.parametrize(
    ("offset", "data_sn", "final", "match"),
    [
        (1024, 0, True, "outside the sequence"),
        (0, 0, False, "F bit"),
    ],
)
def test_a_data_out_that_breaks_the_r2t_is_a_protocol_error(
    offset: int, data_sn: int, final: bool, match: str
) -> None:
    session = Session()
    session.login([("ImmediateData", "No")])
    session.send(scsi_cmd(bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0)), 4, 100, 1024, write=True))
    (r2t,) = session.replies()
    with pytest.raises(RemoteProtocolError, match=match):
        session.send(data_out(4, r2t.field32(20), offset, bytes(1024), data_sn, final))


def test_immediate_data_not_negotiated_is_a_protocol_error() -> None:
    session = Session()
    session.login([("ImmediateData", "No")])
    with pytest.raises(RemoteProtocolError, match="immediate data"):
        session.send(
            scsi_cmd(
                bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)), 4, 100, 512, write=True, data=bytes(512)
            )
        )


def test_the_command_window_bounds_outstanding_tasks() -> None:
    session = Session()
    session.login()
    window = session.conn.config.cmd_window
    assert window >= 32  # a QD32 initiator keeps 32 commands outstanding
    read = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0))
    events = []
    for n in range(window + 2):  # the last two CmdSNs are outside the window: ignored
        events += session.send(scsi_cmd(read, 20 + n, 100 + n, 512, read=True))
    itts = [event.itt for event in events if isinstance(event, ReadRequest)]
    assert itts == list(range(20, 20 + window))
    assert session.conn.outstanding_tasks == window
    session.conn.read_done(20, bytes(512))
    (reply,) = session.replies()
    # ExpCmdSN, MaxCmdSN: one task answered, one more CmdSN in the window
    assert reply.field32(28) == 100 + window and reply.field32(32) == 100 + window


def test_synchronize_cache_is_a_flush_event() -> None:
    session = Session()
    session.login()
    assert session.send(scsi_cmd(bytes((0x35,)) + bytes(9), 6, 100, 0)) == [FlushRequest(6, 0)]
    session.conn.flush_done(6)
    assert session.replies()[0].spec3 == scsi.Status.GOOD


def test_read_capacity_mode_sense_report_luns() -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(bytes((0x25,)) + bytes(9), 1, 100, 8, read=True))
    assert session.replies()[0].data == struct.pack(">II", LUN_BYTES // 512 - 1, 512)
    session.send(
        scsi_cmd(
            bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2), 2, 101, 32, read=True
        )
    )
    assert session.replies()[0].data[:12] == struct.pack(">QI", LUN_BYTES // 512 - 1, 512)
    session.send(scsi_cmd(bytes((0x1A, 0, 0x3F, 0, 255, 0)), 3, 102, 255, read=True))
    mode = session.replies()[0].data
    assert mode[0] == len(mode) - 1 and mode[3] == 8 and mode[12] == 0x08  # caching page
    session.send(
        scsi_cmd(
            bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 64) + bytes(2), 4, 103, 64, read=True
        )
    )
    assert session.replies()[0].data == struct.pack(">I", 8) + bytes(4) + scsi.encode_lun(0)


def test_a_missing_lun_reads_as_not_present() -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(bytes((0x12, 0, 0, 0, 36, 0)), 1, 100, 36, read=True, lun=3))
    assert session.replies()[0].data[0] == 0x7F
    session.send(scsi_cmd(bytes(6), 2, 101, 0, lun=3))
    assert sense_of(session.replies()[0]) == scsi.LUN_NOT_SUPPORTED


def test_nop_out_is_echoed_and_logout_closes() -> None:
    session = Session()
    session.login()
    nop = Pdu(
        Op.NOP_OUT,
        flags=0x80,
        itt=9,
        opcode_specific=pack_fields(RESERVED_TAG, 100, 0, 0, 0, 0, 0),
        data=b"ping",
    )
    session.send(nop)
    (reply,) = session.replies()
    assert (reply.opcode, reply.itt, reply.data) == (Op.NOP_IN, 9, b"ping")
    logout = Pdu(
        Op.LOGOUT_REQ,
        flags=0x80,
        immediate=True,
        itt=10,
        opcode_specific=pack_fields(0, 101, 0, 0, 0, 0, 0),
    )
    assert session.send(logout) == [Closing("logout")]
    (reply,) = session.replies()
    assert reply.opcode == Op.LOGOUT_RSP and reply.spec2 == 0


def test_negotiated_digests_apply_to_both_directions_after_login() -> None:
    session = Session(TargetLimits(prefer_crc32c=True))
    session.login([("HeaderDigest", "None,CRC32C"), ("DataDigest", "None,CRC32C")])
    assert session.digests == (True, True)
    session.send(scsi_cmd(bytes((0x12, 0, 0, 0, 36, 0)), 1, 100, 36, read=True), bytewise=True)
    (reply,) = session.replies()  # parse_target_pdus checks both digests
    assert reply.data[8:16] == scsi.VENDOR
    raw = bytearray(encode_pdu(scsi_cmd(bytes(6), 2, 101, 0), header_digest=True))
    raw[20] ^= 0xFF
    session.conn.receive_data(raw)
    with pytest.raises(DigestError):
        session.conn.next_event()


@pytest.mark.parametrize(
    ("blocks", "edtl", "written", "flags", "residual"),
    [
        (1, 1024, 512, 0x02, 512),  # the initiator sends more than the CDB asks: underflow
        (2, 512, 512, 0x04, 512),  # less: the whole blocks sent are written, overflow
    ],
)
def test_a_write_whose_transfer_length_differs_from_the_cdb_reports_a_residual(
    blocks: int, edtl: int, written: int, flags: int, residual: int
) -> None:
    session = Session()
    session.login([("ImmediateData", "Yes")])
    payload = bytes(range(256)) * (edtl // 256)
    cdb = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, blocks, 0))
    events = session.send(scsi_cmd(cdb, 4, 100, edtl, write=True, data=payload))
    assert events == [WriteRequest(4, 0, 0, payload[:written], fua=False)]
    session.conn.write_done(4)
    (reply,) = session.replies()
    assert reply.spec3 == 0 and reply.flags & 0x06 == flags and reply.field32(44) == residual


def test_mode_sense_10_has_an_8_byte_header_and_read_only_sets_wp() -> None:
    session = Session(read_only=True)
    session.login()
    cdb = bytes((0x5A, 0x08, 0x08, 0, 0, 0, 0)) + struct.pack(">H", 512) + bytes(1)  # DBD
    session.send(scsi_cmd(cdb, 1, 100, 512, read=True))
    data = session.replies()[0].data
    assert struct.unpack_from(">H", data)[0] == len(data) - 2
    assert data[3] & 0x80 and struct.unpack_from(">H", data, 6)[0] == 0  # WP, no descriptor
    assert data[8:10] == b"\x08\x12" and data[10] & 0x04  # caching page, WCE


def test_read_capacity_10_points_past_2_tib_to_read_capacity_16() -> None:
    info = scsi.LunInfo(3 << 40, serial="big")
    reply = scsi.execute(bytes((0x25,)) + bytes(15), 0, {0: info})
    assert isinstance(reply, scsi.Reply)
    assert reply.data == struct.pack(">II", 0xFFFFFFFF, 512)


def test_a_transfer_over_the_limit_is_refused_before_any_buffer_is_made() -> None:
    session = Session(lun_bytes=1 << 30)
    session.login()
    blocks = scsi.MAX_TRANSFER_BYTES // 512 + 1
    cdb = bytes((0x8A, 0)) + struct.pack(">QI", 0, blocks) + bytes(2)
    session.send(scsi_cmd(cdb, 1, 100, blocks * 512, write=True))
    assert sense_of(session.replies()[0]) == scsi.INVALID_FIELD_IN_CDB
    assert session.conn.outstanding_tasks == 0


def test_a_failed_read_answers_medium_error() -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)), 3, 100, 512, read=True))
    session.conn.io_failed(3)
    assert sense_of(session.replies()[0]) == scsi.READ_ERROR
    with pytest.raises(LocalProtocolError):
        session.conn.io_failed(3)
