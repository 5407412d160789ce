"""Session-level features of the sans-I/O iSCSI core: task management, NOP-In pings,
unsolicited data (InitialR2T=No), Data-Out sequence errors, CHAP. Bytes in, PDUs out."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from common.iscsi import scsi, standalone
from common.iscsi.chap import ChapAuthenticator, ChapError, ChapSecrets, chap_response
from common.iscsi.pdu import (
    RESERVED_TAG,
    LocalProtocolError,
    Op,
    Pdu,
    RemoteProtocolError,
    pack_fields,
)
from common.iscsi.target import (
    Closing,
    FlushRequest,
    IscsiTargetConnection,
    LoggedIn,
    ReadRequest,
    WriteRequest,
)
from common.iscsi.textkeys import TargetLimits
from tests.unit.test_iscsi_core import (
    INITIATOR,
    IQN,
    Session,
    data_out,
    login_pdu,
    scsi_cmd,
    sense_of,
)

pytestmark = pytest.mark.timeout(30)

READ_1 = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0))  # READ 10, LBA 0, 1 block
SYNC = bytes((0x35,)) + bytes(9)
SECRETS = ChapSecrets("alice", b"twelve+bytes!", "target", b"another-secret")


def write10(lba: int, blocks: int) -> bytes:
    return bytes((0x2A, 0)) + struct.pack(">I", lba) + bytes((0, 0, blocks, 0))


def tmf(
    function: int,
    itt: int,
    cmd_sn: int,
    *,
    ref_itt: int = RESERVED_TAG,
    ref_cmd_sn: int = 0,
    lun: int = 0,
    immediate: bool = True,
) -> Pdu:
    return Pdu(
        Op.TASK_MGMT_REQ,
        flags=0x80 | function,
        immediate=immediate,
        lun_or_isid=scsi.encode_lun(lun),
        itt=itt,
        opcode_specific=pack_fields(ref_itt, cmd_sn, 0, ref_cmd_sn, 0, 0, 0),
    )


def nop_out_reply(ttt: int) -> Pdu:
    return Pdu(
        Op.NOP_OUT,
        flags=0x80,
        immediate=True,
        itt=RESERVED_TAG,
        opcode_specific=pack_fields(ttt, 200, 0, 0, 0, 0, 0),
    )


def session_with(**config: object) -> Session:
    session = Session()
    base = session.conn.config
    session.conn = IscsiTargetConnection(dataclasses.replace(base, **config), tsih=5)  # type: ignore[arg-type]
    return session


def tmf_responses(pdus: list[Pdu]) -> list[tuple[int, int]]:
    return [(pdu.itt, pdu.spec2) for pdu in pdus if pdu.opcode == Op.TASK_MGMT_RSP]


# -- task management ----------------------------------------------------------------------


def test_abort_task_during_r2t_drops_the_write_and_its_late_data_out() -> None:
    session = Session()
    session.login([("ImmediateData", "No")])
    session.send(scsi_cmd(write10(0, 2), 4, 100, 1024, write=True))
    (r2t,) = session.replies()
    assert r2t.opcode == Op.R2T
    assert session.send(tmf(1, 9, 101, ref_itt=4, ref_cmd_sn=100)) == []
    replies = session.replies()
    assert tmf_responses(replies) == [(9, 0)]  # Function complete, and no SCSI Response
    assert [pdu.opcode for pdu in replies] == [Op.TASK_MGMT_RSP]
    assert session.conn.outstanding_tasks == 0
    # the initiator had already sent the R2T's data: dropped quietly, never written
    assert session.send(data_out(4, r2t.field32(20), 0, bytes(1024), 0, final=True)) == []
    assert session.replies() == []
    events = session.send(scsi_cmd(READ_1, 5, 101, 512, read=True))
    assert events == [ReadRequest(5, 0, 0, 512)]


def test_abort_of_an_unknown_task_says_it_does_not_exist() -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(READ_1, 4, 100, 512, read=True))
    session.conn.read_done(4, bytes(512))
    session.replies()
    # the READ (CmdSN 100) has completed: its CmdSN is behind ExpCmdSN
    session.send(tmf(1, 9, 101, ref_itt=4, ref_cmd_sn=100))
    assert tmf_responses(session.replies()) == [(9, 1)]
    # a command never received (CmdSN 101, lost), RefCmdSN in the window and before the
    # TMF's own CmdSN: taken as received, so the window moves past it
    session.send(tmf(1, 10, 102, ref_itt=77, ref_cmd_sn=101))
    (response,) = session.replies()
    assert (response.spec2, response.field32(28)) == (0, 102)


def test_abort_of_a_read_in_flight_answers_only_when_the_adapter_is_done() -> None:
    session = Session()
    session.login()
    assert session.send(scsi_cmd(READ_1, 4, 100, 512, read=True)) == [ReadRequest(4, 0, 0, 512)]
    session.send(tmf(1, 9, 101, ref_itt=4, ref_cmd_sn=100))
    assert session.replies() == []  # the read is still with the adapter
    session.conn.read_done(4, bytes(512))  # late: dropped, no Data-In
    assert tmf_responses(replies := session.replies()) == [(9, 0)]
    assert [pdu.opcode for pdu in replies] == [Op.TASK_MGMT_RSP]
    with pytest.raises(LocalProtocolError):
        session.conn.read_done(4, bytes(512))  # twice is our misuse, not a crash later


def test_an_aborted_write_in_flight_ignores_its_late_completion_or_failure() -> None:
    session = Session()
    session.login()
    events = session.send(scsi_cmd(write10(0, 1), 4, 100, 512, write=True, data=bytes(512)))
    assert isinstance(events[0], WriteRequest)
    assert session.send(scsi_cmd(SYNC, 5, 101, 0)) == [FlushRequest(5, 0)]
    session.send(tmf(6, 9, 102))  # TARGET WARM RESET: both tasks
    assert session.replies() == []
    session.conn.io_failed(4)
    assert session.replies() == []  # still waiting for the flush
    session.conn.flush_done(5)
    assert tmf_responses(session.replies()) == [(9, 0)]
    assert session.conn.outstanding_tasks == 0


def test_a_second_abort_of_a_task_in_flight_waits_for_it_too() -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(READ_1, 4, 100, 512, read=True))
    session.send(tmf(1, 9, 101, ref_itt=4, ref_cmd_sn=100))
    session.send(tmf(2, 10, 101))  # ABORT TASK SET: the same read
    assert session.replies() == []
    session.conn.read_done(4, bytes(512))
    assert tmf_responses(session.replies()) == [(9, 0), (10, 0)]


def two_block_write_awaiting_unsolicited_data() -> Session:
    """InitialR2T=No, no immediate data: a WRITE (ITT 4) of 1024 bytes sent without its
    F bit, so unsolicited Data-Out is to follow."""
    session = Session()
    session.login([("InitialR2T", "No"), ("ImmediateData", "No")])
    command = scsi_cmd(write10(0, 2), 4, 100, 1024, write=True)
    command.flags &= ~0x80
    session.send(command)
    return session


def test_an_abort_while_unsolicited_data_comes_drops_the_rest_of_it() -> None:
    session = two_block_write_awaiting_unsolicited_data()
    session.send(unsolicited(4, 0, bytes(512), 0, final=False))
    session.send(tmf(1, 9, 101, ref_itt=4, ref_cmd_sn=100))
    assert tmf_responses(session.replies()) == [(9, 0)]
    assert session.send(unsolicited(4, 512, bytes(512), 1, final=True)) == []
    assert session.replies() == [] and session.conn.outstanding_tasks == 0


def test_lun_reset_aborts_the_tasks_of_that_lun_only() -> None:
    session = Session()
    session.login([("ImmediateData", "No")])
    session.send(scsi_cmd(write10(0, 1), 4, 100, 512, write=True))
    session.send(scsi_cmd(write10(8, 1), 5, 101, 512, write=True, lun=1))  # no LUN 1
    replies = session.replies()
    assert replies[0].opcode == Op.R2T and sense_of(replies[1])[:2] == (
        scsi.SenseKey.ILLEGAL_REQUEST,
        0x25,
    )
    session.send(tmf(5, 9, 102, lun=1))
    assert tmf_responses(session.replies()) == [(9, 2)]  # LUN does not exist
    assert session.conn.outstanding_tasks == 1
    session.send(tmf(5, 10, 102, lun=0))
    assert tmf_responses(session.replies()) == [(10, 0)]
    assert session.conn.outstanding_tasks == 0


@pytest.mark.parametrize(("function", "response"), [(3, 5), (7, 5), (8, 4), (9, 5), (0x7F, 5)])
def test_other_task_management_functions_are_not_supported(function: int, response: int) -> None:
    session = Session()
    session.login()
    session.send(scsi_cmd(READ_1, 4, 100, 512, read=True))
    session.send(tmf(function, 9, 101, ref_itt=4))
    assert tmf_responses(session.replies()) == [(9, response)]
    assert session.conn.outstanding_tasks == 1  # nothing aborted


def test_a_non_immediate_tmf_takes_a_cmd_sn_and_one_outside_the_window_is_ignored() -> None:
    session = Session()
    session.login()
    session.send(tmf(2, 9, 100, immediate=False))  # ABORT TASK SET with CmdSN 100
    (response,) = session.replies()
    assert response.spec2 == 0 and response.field32(28) == 101
    session.send(tmf(2, 10, 150, immediate=False))
    assert session.replies() == []


# -- NOP-In pings ---------------------------------------------------------------------------


def test_an_idle_initiator_is_pinged_and_an_answer_keeps_the_connection() -> None:
    session = session_with(nop_in_interval_s=5.0, nop_in_timeout_s=10.0)
    session.login()
    conn = session.conn
    assert conn.tick(100.0) is None and conn.tick(104.9) is None
    assert session.replies() == []
    assert conn.tick(105.0) is None
    (ping,) = session.replies()
    assert ping.opcode == Op.NOP_IN and ping.itt == RESERVED_TAG
    ttt = ping.field32(20)
    assert ttt != RESERVED_TAG and ping.field32(24) == conn.stat_sn  # StatSN not advanced
    session.send(nop_out_reply(ttt))
    assert session.replies() == []  # no answer to an answer
    assert conn.tick(114.0) is None  # answered: not dropped; heard at 114
    assert conn.tick(118.9) is None and session.replies() == []
    assert conn.tick(119.0) is None
    assert len(session.replies()) == 1


def test_a_ping_without_answer_drops_the_connection_whatever_else_comes() -> None:
    session = session_with(nop_in_interval_s=1.0, nop_in_timeout_s=2.0)
    session.login()
    conn = session.conn
    conn.tick(0.0)
    conn.tick(1.0)
    (ping,) = session.replies()
    session.send(nop_out_reply(ping.field32(20) + 1))  # a wrong TTT answers nothing
    assert conn.tick(2.9) is None
    closing = conn.tick(3.0)
    assert isinstance(closing, Closing) and "NOP-In" in closing.why
    assert conn.tick(10.0) is None  # closed: nothing more


def test_no_ping_during_login_and_a_login_not_done_in_time_is_dropped() -> None:
    session = session_with(nop_in_interval_s=1.0, nop_in_timeout_s=1.0)
    session.send(login_pdu([*NAMES, ("AuthMethod", "None")], 0, None))  # no transit yet
    assert session.replies()[0].opcode_specific[16:18] == b"\0\0"
    assert session.conn.tick(10.0) is None and session.conn.tick(11.9) is None
    assert session.conn.data_to_send() == b""
    closing = session.conn.tick(12.0)
    assert isinstance(closing, Closing) and "login not completed in 2 s" in closing.why


def test_no_ping_while_the_adapter_holds_io_for_the_initiator() -> None:
    session = session_with(nop_in_interval_s=1.0, nop_in_timeout_s=1.0)
    session.login()
    session.conn.tick(0.0)
    session.conn.tick(1.0)
    assert len(session.replies()) == 1  # idle: pinged
    session.send(scsi_cmd(SYNC, 4, 100, 0))  # a slow flush: the adapter may not read now
    for now in (2.0, 5.0, 30.0):
        assert session.conn.tick(now) is None  # the open ping is forgotten, none sent
    assert session.replies() == []
    session.conn.flush_done(4)
    session.replies()
    assert session.conn.tick(30.5) is None and session.replies() == []
    assert session.conn.tick(31.0) is None and len(session.replies()) == 1  # idle again


# -- unsolicited data, Data-Out sequences --------------------------------------------------


def test_initial_r2t_no_is_granted_only_when_asked() -> None:
    session = Session()
    replies = session.login([("InitialR2T", "No")])
    assert ("InitialR2T", "No") in parse_pairs(replies[-1])
    assert session.conn.params.initial_r2t is False
    other = Session()
    other.login([("InitialR2T", "Yes")])
    assert other.conn.params.initial_r2t is True


def parse_pairs(pdu: Pdu) -> list[tuple[str, str]]:
    items = pdu.data.rstrip(b"\0").split(b"\0")
    return [tuple(item.decode().split("=", 1)) for item in items]  # type: ignore[misc]


def unsolicited(itt: int, offset: int, data: bytes, data_sn: int, final: bool) -> Pdu:
    return data_out(itt, RESERVED_TAG, offset, data, data_sn, final)


@pytest.mark.parametrize("immediate", [True, False])
def test_unsolicited_data_up_to_first_burst_then_r2t_for_the_rest(immediate: bool) -> None:
    session = Session(TargetLimits(first_burst_bytes=4096))
    yes_no = "Yes" if immediate else "No"
    session.login([("InitialR2T", "No"), ("ImmediateData", yes_no), ("FirstBurstLength", "4096")])
    payload = bytes((i * 13) & 0xFF for i in range(8192))
    first = 1024 if immediate else 0
    command = scsi_cmd(write10(0, 16), 4, 100, 8192, write=True, data=payload[:first])
    command.flags &= ~0x80  # unsolicited Data-Out follows
    assert session.send(command) == []
    session.send(unsolicited(4, first, payload[first:3072], 0, final=False))
    assert session.replies() == []
    assert session.send(unsolicited(4, 3072, payload[3072:4096], 1, final=True)) == []
    (r2t,) = session.replies()
    assert r2t.opcode == Op.R2T and (r2t.field32(40), r2t.field32(44)) == (4096, 4096)
    events = session.send(data_out(4, r2t.field32(20), 4096, payload[4096:], 0, final=True))
    assert events == [WriteRequest(4, 0, 0, payload, fua=False)]


def test_unsolicited_data_beyond_first_burst_fails_the_command_after_its_f_bit() -> None:
    session = Session(TargetLimits(first_burst_bytes=1024))
    session.login([("InitialR2T", "No"), ("ImmediateData", "No"), ("FirstBurstLength", "1024")])
    command = scsi_cmd(write10(0, 4), 4, 100, 2048, write=True)
    command.flags &= ~0x80
    session.send(command)
    assert session.send(unsolicited(4, 0, bytes(2048), 0, final=True)) == []  # no write
    (reply,) = session.replies()
    assert sense_of(reply) == (0x0B, 0x0C, 0x0C)  # unexpected unsolicited data
    assert session.conn.outstanding_tasks == 0


def test_unsolicited_data_without_initial_r2t_no_is_a_protocol_error() -> None:
    session = Session()
    session.login([("ImmediateData", "No")])
    command = scsi_cmd(write10(0, 2), 4, 100, 1024, write=True)
    command.flags &= ~0x80
    with pytest.raises(RemoteProtocolError, match="F bit"):
        session.send(command)
    other = Session()
    other.login([("ImmediateData", "No")])
    other.send(scsi_cmd(write10(0, 2), 4, 100, 1024, write=True))
    with pytest.raises(RemoteProtocolError, match="no open sequence"):
        other.send(unsolicited(4, 0, bytes(512), 0, final=True))


@pytest.mark.parametrize("data_sns", [(0, 0), (1, 0), (27,), (0xFFFFFFFF,)])
def test_a_data_sn_gap_fails_the_write_with_check_condition_and_the_session_goes_on(
    data_sns: tuple[int, ...],
) -> None:
    session = Session()
    session.login([("ImmediateData", "No")])
    length = 512 * len(data_sns)
    session.send(scsi_cmd(write10(0, len(data_sns)), 4, 100, length, write=True))
    (r2t,) = session.replies()
    events, replies = [], []
    for n, data_sn in enumerate(data_sns):
        final = n == len(data_sns) - 1
        events += session.send(data_out(4, r2t.field32(20), 512 * n, bytes(512), data_sn, final))
        replies += session.replies()
        assert replies == [] or final  # the answer waits for the sequence's F bit
    assert events == []  # nothing written
    (reply,) = replies
    assert sense_of(reply) == (0x0B, 0x47, 0x05)  # protocol service CRC error
    assert session.conn.outstanding_tasks == 0
    assert session.send(scsi_cmd(READ_1, 5, 101, 512, read=True)) == [ReadRequest(5, 0, 0, 512)]


def test_a_data_sn_gap_in_unsolicited_data_fails_the_write_too() -> None:
    session = two_block_write_awaiting_unsolicited_data()
    session.send(unsolicited(4, 0, bytes(512), 1, final=False))
    assert session.send(unsolicited(4, 512, bytes(512), 1, final=True)) == []
    (reply,) = session.replies()
    assert sense_of(reply) == (0x0B, 0x47, 0x05)


def test_a_command_failing_while_unsolicited_data_comes_answers_after_the_data() -> None:
    session = Session(lun_bytes=4096)
    session.login([("InitialR2T", "No"), ("ImmediateData", "No")])
    command = scsi_cmd(write10(100, 1), 4, 100, 512, write=True)  # beyond the LUN
    command.flags &= ~0x80
    session.send(command)
    assert session.replies() == []
    session.send(unsolicited(4, 0, bytes(512), 0, final=True))
    (reply,) = session.replies()
    assert sense_of(reply) == (scsi.SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)


def test_a_read_flagged_as_a_write_reads_nothing_and_reports_the_overflow() -> None:
    """libiscsi's iSCSIResiduals.Read10Invalid: the Expected Data Transfer Length for the
    read direction is 0, so the whole READ is a residual overflow (RFC 7143 11.4.5.1)."""
    session = Session()
    session.login()
    events = session.send(scsi_cmd(READ_1, 4, 100, 512, write=True, data=bytes(512)))
    assert events == []
    (reply,) = session.replies()
    assert reply.opcode == Op.SCSI_RSP and reply.spec3 == scsi.Status.GOOD
    assert reply.flags & 0x04 and reply.field32(44) == 512  # O bit, residual 512


# -- CHAP -----------------------------------------------------------------------------------


def test_chap_secrets_are_checked_when_configured() -> None:
    with pytest.raises(ValueError, match="12"):
        ChapSecrets("alice", b"short")
    with pytest.raises(ValueError, match="differ"):
        ChapSecrets("alice", b"twelve+bytes!", "target", b"twelve+bytes!")
    with pytest.raises(ValueError, match="both"):
        ChapSecrets("alice", b"twelve+bytes!", "target", None)


NAMES = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Normal")]


def chap_login_until_challenge(session: Session) -> tuple[int, bytes]:
    session.send(login_pdu([*NAMES, ("AuthMethod", "CHAP,None")], 0, 1))
    (answer,) = session.replies()
    assert ("AuthMethod", "CHAP") in parse_pairs(answer)
    assert answer.flags & 0x80 == 0  # no transit before CHAP is done
    session.send(login_pdu([("CHAP_A", "7,5")], 0, None))
    (challenge,) = session.replies()
    pairs = dict(parse_pairs(challenge))
    assert pairs["CHAP_A"] == "5" and pairs["CHAP_C"].startswith("0x")
    challenge_bytes = bytes.fromhex(pairs["CHAP_C"][2:])
    assert len(challenge_bytes) >= 16
    return int(pairs["CHAP_I"]), challenge_bytes


def chap_reply(identifier: int, secret: bytes, challenge: bytes, user: str = "alice") -> Pdu:
    response = chap_response(identifier, secret, challenge)
    return login_pdu([("CHAP_N", user), ("CHAP_R", "0x" + response.hex())], 0, 1)


def test_chap_login_with_the_right_secret_then_mutual_answer() -> None:
    session = session_with(chap=SECRETS)
    identifier, challenge = chap_login_until_challenge(session)
    mine = bytes(range(16))
    pdu = chap_reply(identifier, SECRETS.secret, challenge)
    pdu.data += b"CHAP_I=9\0CHAP_C=0x" + mine.hex().encode() + b"\0"
    session.send(pdu)
    (answer,) = session.replies()
    assert answer.opcode_specific[16:18] == b"\0\0" and answer.flags & 0x80  # transit
    pairs = dict(parse_pairs(answer))
    assert pairs["CHAP_N"] == "target"
    assert pairs["CHAP_R"] == "0x" + chap_response(9, b"another-secret", mine).hex()
    events = session.send(login_pdu([("MaxRecvDataSegmentLength", "8192")], 1, 3))
    assert any(isinstance(event, LoggedIn) for event in events)


@pytest.mark.parametrize(
    "case", ["wrong secret", "wrong user", "no CHAP offered", "skips security", "reflection"]
)
def test_a_failed_chap_login_is_an_authentication_failure(case: str) -> None:
    session = session_with(chap=SECRETS)
    if case == "no CHAP offered":
        session.send(login_pdu([*NAMES, ("AuthMethod", "None")], 0, 1))
    elif case == "skips security":
        session.send(login_pdu([*NAMES, ("MaxRecvDataSegmentLength", "8192")], 1, 3))
    else:
        identifier, challenge = chap_login_until_challenge(session)
        secret = b"not-the-secret" if case == "wrong secret" else SECRETS.secret
        pdu = chap_reply(identifier, secret, challenge, "bob" if case == "wrong user" else "alice")
        if case == "reflection":  # our own challenge sent back for us to answer
            pdu.data += b"CHAP_I=1\0CHAP_C=0x" + challenge.hex().encode() + b"\0"
        session.send(pdu)
    events = session.send(Pdu(Op.NOP_OUT))  # after the refusal nothing is read
    replies = session.replies()
    assert replies[-1].opcode == Op.LOGIN_RSP
    assert replies[-1].opcode_specific[16:18] == b""
    assert session.conn.phase.name == "CLOSED" and events == []


def test_a_chap_response_from_another_login_does_not_pass() -> None:
    first = session_with(chap=SECRETS)
    identifier, challenge = chap_login_until_challenge(first)
    recorded = chap_reply(identifier, SECRETS.secret, challenge)
    second = session_with(chap=SECRETS)
    chap_login_until_challenge(second)
    second.send(recorded)
    assert second.replies()[-1].opcode_specific[16:18] == b""


def test_a_discovery_session_needs_chap_too() -> None:
    session = session_with(chap=SECRETS)
    names = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]
    session.send(login_pdu([*names, ("AuthMethod", "None")], 0, 1))
    assert session.replies()[-1].opcode_specific[16:18] == b""


def test_one_authenticator_checks_one_response() -> None:
    authenticator = ChapAuthenticator(SECRETS, random_bytes=lambda n: bytes(n))
    with pytest.raises(ChapError):
        authenticator.verify({"CHAP_N": "alice", "CHAP_R": "0x00"})  # no challenge yet
    pairs = dict(authenticator.challenge({"CHAP_A": "5"}))
    right = chap_response(int(pairs["CHAP_I"]), SECRETS.secret, bytes(16))
    assert authenticator.verify({"CHAP_N": "alice", "CHAP_R": "0x" + right.hex()}) == []
    with pytest.raises(ChapError, match="second"):
        authenticator.verify({"CHAP_N": "alice", "CHAP_R": "0x" + right.hex()})
    with pytest.raises(ChapError, match="MD5"):
        ChapAuthenticator(SECRETS).challenge({"CHAP_A": "6,7"})


def test_standalone_reads_the_chap_secret_file_and_refuses_a_short_one(tmp_path: Path) -> None:
    (tmp_path / "good").write_bytes(b"twelve+bytes!\n")
    (tmp_path / "short").write_bytes(b"eleven-byte\n")
    lun = ["--iqn", IQN, "--lun", str(tmp_path / "lun.img")]
    chap = [*lun, "--chap-user", "alice", "--chap-secret-file"]
    good = standalone.parse_args([*chap, str(tmp_path / "good")])
    assert standalone.chap_secrets(good) == ChapSecrets("alice", b"twelve+bytes!")
    short = standalone.parse_args([*chap, str(tmp_path / "short")])
    with pytest.raises(ValueError, match="11 bytes"):
        standalone.chap_secrets(short)
    alone = standalone.parse_args([*lun, "--chap-user", "alice"])
    with pytest.raises(ValueError, match="together"):
        standalone.chap_secrets(alone)
    assert standalone.chap_secrets(standalone.parse_args(lun)) is None
