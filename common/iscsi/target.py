"""Sans-I/O iSCSI target connection (RFC 7143): bytes in, events out, PDUs queued.

    LOGIN ── Login Request (CSG 0 security: AuthMethod=None, or CHAP when configured:
      │        AuthMethod=CHAP, CHAP_A ─► CHAP_I/CHAP_C, CHAP_N/CHAP_R checked, chap.py)
      │      Login Request (CSG 1 operational: keys negotiated, textkeys.py)
      │      T=1 NSG=3 ─► Login Response with TSIH, digests switched on
      ▼
    FULL_FEATURE
      Discovery session: Text Request SendTargets ─► Text Response; Logout
      Normal session:    SCSI Command ─► scsi.execute()
                           ├─ Reply  ─► Data-In (S bit) or SCSI Response (sense)
                           ├─ READ   ─► event ReadRequest ─► read_done(itt, data) ─► Data-In
                           ├─ WRITE  ─► immediate data, unsolicited Data-Out (InitialR2T=No,
                           │            up to FirstBurstLength), then R2T / Data-Out (one R2T
                           │            at a time, MaxBurstLength each) ─► event WriteRequest
                           │            ─► write_done(itt) ─► SCSI Response
                           ├─ FLUSH  ─► event FlushRequest ─► flush_done(itt)
                           └─ UNMAP, WRITE SAME ─► R2T / Data-Out as a WRITE ─► scsi.
                                        parameters_received() ─► event UnmapRequest or
                                        WriteSameRequest ─► write_done(itt)
                         Task Management ─► tasks dropped without SCSI Response; TMF
                           Response once the adapter has answered the aborted I/O it holds
                         NOP-Out ─► NOP-In; Logout ─► Logout Response, CLOSED
      tick(now) ─► NOP-In ping to a silent initiator; no answer in time ─► Closing

ErrorRecoveryLevel is 0: a protocol error closes the connection (the adapter catches
RemoteProtocolError); a lost Data-Out (DataSN gap) fails its command only. What a connection
holds is bounded: at most `cmd_window` tasks (MaxCmdSN), and write data (a task's buffer,
then its WriteRequest until answered) is counted against `write_buffer_bytes_max`: a write
gets its R2Ts only while that budget has room for all it still wants (or when no other
write is granted or in flight, so one always goes on); the others wait, first come first
served. Only unsolicited data (at most FirstBurstLength a task) comes without asking, so a
connection holds at most max(write_buffer_bytes_max, MAX_TRANSFER_BYTES) + (cmd_window +
MAX_IMMEDIATE_TASKS) x FirstBurstLength of write data (a write granted over the budget is
granted alone). No clock, no disk, no await.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto

from common.iscsi import scsi
from common.iscsi.chap import ChapAuthenticator, ChapError, ChapSecrets
from common.iscsi.pdu import (
    FLAG_FINAL,
    RESERVED_TAG,
    LocalProtocolError,
    Op,
    Pdu,
    PduReader,
    RemoteProtocolError,
    encode_pdu,
    pack_fields,
)
from common.iscsi.textkeys import (
    MAX_TEXT_BYTES,
    Negotiator,
    Pairs,
    SessionParams,
    TargetLimits,
    encode_text,
    parse_text,
)

# Login stages (CSG/NSG)
SECURITY = 0
OPERATIONAL = 1
FULL_FEATURE = 3
# Login status (class, detail), RFC 7143 11.13.5
LOGIN_OK = (0x00, 0x00)
LOGIN_AUTH_FAILED = (0x02, 0x01)
LOGIN_NOT_FOUND = (0x02, 0x03)
LOGIN_UNSUPPORTED_VERSION = (0x02, 0x05)
LOGIN_MISSING_PARAMETER = (0x02, 0x07)
LOGIN_NO_SESSION = (0x02, 0x0A)
LOGIN_INITIATOR_ERROR = (0x02, 0x00)
# Reject reasons, RFC 7143 11.17.1
REJECT_COMMAND_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE = 0x06
REJECT_INVALID_FIELD = 0x09
REJECT_PROTOCOL_ERROR = 0x04
# Task management functions and responses, RFC 7143 11.5.1 and 11.6.1
TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TASK_REASSIGN = 8
TMF_COMPLETE = 0x00
TMF_NO_TASK = 0x01
TMF_NO_LUN = 0x02
TMF_REASSIGN_NOT_SUPPORTED = 0x04
TMF_NOT_SUPPORTED = 0x05
# iSCSI conditions as sense data (key ABORTED COMMAND), RFC 7143 11.4.7.2
PROTOCOL_SERVICE_CRC_ERROR = (0x0B, 0x47, 0x05)
UNEXPECTED_UNSOLICITED_DATA = (0x0B, 0x0C, 0x0C)

# Enum members for the per-command path, looked up once: Python 3.11 takes ~0.2 us for each
# `Enum.MEMBER` (a global: ~0.02 us), and a command would look up a dozen.
_READ, _WRITE, _FLUSH = scsi.IoKind.READ, scsi.IoKind.WRITE, scsi.IoKind.FLUSH
_WRITE_SAME, _GOOD = scsi.IoKind.WRITE_SAME, scsi.Status.GOOD
_DATA_IN, _SCSI_RSP, _R2T = Op.DATA_IN, Op.SCSI_RSP, Op.R2T
MAX_IMMEDIATE_TASKS = 4
_SCSI_FLAG_READ = 0x40
_SCSI_FLAG_WRITE = 0x20
_RESIDUAL_OVERFLOW = 0x04
_RESIDUAL_UNDERFLOW = 0x02
_DATA_IN_STATUS = 0x01
_LOGIN_TRANSIT = 0x80
_CONTINUE = 0x40


@dataclass(frozen=True, slots=True)
class TargetConfig:
    iqn: str
    luns: Mapping[int, scsi.LunInfo]
    portal: str  # "host:port" for SendTargets' TargetAddress
    limits: TargetLimits = field(default_factory=TargetLimits)
    portal_group: int = 1
    # commands an initiator may have outstanding (MaxCmdSN - ExpCmdSN + 1): QD32 initiators
    # keep 32 in flight; memory is bounded by write_buffer_bytes_max, not by this
    cmd_window: int = 32
    # write data a connection holds for R2Ts granted and writes not yet answered
    write_buffer_bytes_max: int = 16 << 20
    # a NOP-In ping after this long without a byte from the initiator; no NOP-Out answer
    # within nop_in_timeout_s drops the connection
    nop_in_interval_s: float = 5.0
    nop_in_timeout_s: float = 10.0
    chap: ChapSecrets | None = None  # when set, every login must pass CHAP


@dataclass(frozen=True, slots=True)
class LoggedIn:
    session_type: str
    initiator_name: str
    params: SessionParams


# slots, not frozen: made once a command (a frozen dataclass costs ~2 µs more to build)
@dataclass(slots=True)
class ReadRequest:
    itt: int
    lun: int
    offset: int
    length: int


# slots, not frozen: made once a command (a frozen dataclass costs ~2 µs more to build)
@dataclass(slots=True)
class WriteRequest:
    """`data` is the whole write, owned by the event."""

    itt: int
    lun: int
    offset: int
    data: bytes
    fua: bool


@dataclass(frozen=True, slots=True)
class UnmapRequest:
    """Deallocate each (byte offset, length) extent, which then reads as zeros: an UNMAP, or
    a WRITE SAME of a zero block with its UNMAP bit. Answered with write_done()."""

    itt: int
    lun: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class WriteSameRequest:
    """Make [offset, offset + length) the one `block` repeated (WRITE SAME); when the
    block is all zeros, zero the range keeping it allocated. Answered with write_done()."""

    itt: int
    lun: int
    offset: int
    length: int
    block: bytes

    @property
    def zeros(self) -> bool:
        return self.block == bytes(len(self.block))


@dataclass(frozen=True, slots=True)
class FlushRequest:
    itt: int
    lun: int


@dataclass(frozen=True, slots=True)
class Closing:
    """The connection is done (logout, failed login): send what is queued, then close."""

    why: str
    authentication_failed: bool = False  # a login refused with "authentication failure"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = (
    LoggedIn | ReadRequest | WriteRequest | UnmapRequest | WriteSameRequest | FlushRequest | Closing
)


class Phase(Enum):
    LOGIN = auto()
    FULL_FEATURE = auto()
    CLOSED = auto()


@dataclass(slots=True)
class _Task:
    itt: int
    lun: int
    expected_bytes: int  # ExpectedDataTransferLength
    immediate: bool
    io: scsi.Io | None = None
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0
    ttt: int = RESERVED_TAG
    r2t_end: int = 0
    r2t_sn: int = 0
    data_sn: int = 0  # next expected DataSN of the current Data-Out sequence
    unsolicited_open: bool = False  # unsolicited Data-Out (TTT reserved) may still come
    unsolicited_end: int = 0  # ... up to this offset: min(FirstBurstLength, EDTL)
    in_flight: bool = False  # the adapter has its I/O event and has not answered yet
    held_bytes: int = 0  # write data counted against write_buffer_bytes_max
    granted: bool = False  # its R2Ts may go out (room was found for all it still wants)
    waiting_for_room: bool = False  # in the R2T queue
    aborted: bool = False  # by a TMF while in flight: the answer is dropped
    # the answer (and bytes transferred) to send once the initiator ends the Data-Out
    # sequence it is in (F bit): the command failed while data was still expected, whose
    # data is dropped (RFC 7143 11.4, Status: the response waits for that F bit)
    pending: tuple[scsi.Reply, int | None] | None = None


@dataclass(slots=True)
class _PendingTmf:
    """A TMF response held until the adapter has answered every aborted task it holds, so
    nothing of an aborted task (a late write above all) happens after the initiator is told
    it is gone (RFC 7143 11.5/11.6 with SAM: a TMF completes once its tasks are ended)."""

    itt: int
    response: int
    waiting: set[int]


def _serial_le(a: int, b: int) -> bool:
    """a <= b in 32-bit serial number arithmetic (RFC 1982)."""
    return ((b - a) & 0xFFFFFFFF) < 0x80000000


class IscsiTargetConnection:
    """One initiator connection, from the first Login Request to the Logout Response."""

    def __init__(self, config: TargetConfig, tsih: int) -> None:
        self.config = config
        self.tsih = tsih & 0xFFFF or 1
        self.phase = Phase.LOGIN
        self.reader = PduReader(config.limits.max_recv_data_segment_bytes)
        self.negotiator = Negotiator(config.limits)
        self.params = self.negotiator.params
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._events: list[Event] = []
        self._digests = (False, False)
        self._stage = -1  # the login stage the next Login Request must be in; -1: first
        self._isid = bytes(6)
        self._login_text = bytearray()
        self._first_login_response = True
        self.stat_sn = 0
        self.exp_cmd_sn = 0
        self._tasks: dict[int, _Task] = {}
        self._queued_tasks = 0  # non-immediate tasks: what the command window counts
        self._immediate_tasks = 0
        self._held_bytes = 0  # write data held (see the module docstring)
        self._r2t_queue: deque[int] = deque()  # ITTs of writes waiting for room, in order
        self._next_ttt = 1
        # ITTs of tasks aborted while the initiator may still send Data-Out for them:
        # those PDUs are dropped quietly (bounded: the oldest are forgotten)
        self._aborted_itts: OrderedDict[int, None] = OrderedDict()
        self._pending_tmfs: list[_PendingTmf] = []
        self._chap = ChapAuthenticator(config.chap) if config.chap else None
        self._authenticated = config.chap is None
        # NOP-In pings: times come from tick(now), never from a clock of ours
        self._heard_since_tick = False
        self._connected_s: float | None = None  # the first tick
        self._last_heard_s: float | None = None
        self._ping: tuple[int, float] | None = None  # (TTT, sent at) of the open ping
        self._handlers: dict[int, Callable[[Pdu], None]] = {  # full feature phase
            Op.SCSI_CMD: self._scsi_command,
            Op.DATA_OUT: self._data_out,
            Op.NOP_OUT: self._nop_out,
            Op.TEXT_REQ: self._text,
            Op.LOGOUT_REQ: self._logout,
            Op.TASK_MGMT_REQ: self._task_management,
        }

    # -- the adapter's side -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.reader.buffered + len(data) > self.reader.buffer_limit + (1 << 20):
            raise LocalProtocolError("receive_data without draining next_event()")
        self._heard_since_tick = self._heard_since_tick or bool(data)
        self.reader.feed(data)

    def tick(self, now_s: float) -> Closing | None:
        """Time has passed (the adapter calls this every tick_interval_s with a monotonic
        clock). In full feature phase, an initiator silent for nop_in_interval_s gets a
        NOP-In asking for a NOP-Out; a ping unanswered for nop_in_timeout_s returns the
        Closing the adapter must act on (drop the connection). Also queues bytes to send."""
        if self.phase is Phase.CLOSED:
            return None
        if self._connected_s is None:
            self._connected_s = now_s
        if self.phase is Phase.LOGIN:
            return self._login_deadline(now_s)
        if any(task.in_flight for task in self._tasks.values()):
            # the initiator waits for our I/O, and the adapter may not read the socket
            # meanwhile (an answer to a ping would sit there unread): not idle
            self._ping = None
            self._heard_since_tick = True
        if self._heard_since_tick or self._last_heard_s is None:
            self._last_heard_s = now_s
            self._heard_since_tick = False
        if self._ping is not None:
            ttt, sent_s = self._ping
            if now_s - sent_s < self.config.nop_in_timeout_s:
                return None
            self.phase = Phase.CLOSED
            return Closing(
                f"no NOP-Out answered the NOP-In ping (TTT 0x{ttt:08x}) in "
                f"{self.config.nop_in_timeout_s:g} s: the initiator is gone"
            )
        if now_s - self._last_heard_s >= self.config.nop_in_interval_s:
            self._send_ping(now_s)
        return None

    def _login_deadline(self, now_s: float) -> Closing | None:
        """A connection that does not finish its login within the ping interval plus its
        timeout holds a connection slot for nothing: dropped."""
        assert self._connected_s is not None
        limit_s = self.config.nop_in_interval_s + self.config.nop_in_timeout_s
        if now_s - self._connected_s < limit_s:
            return None
        self.phase = Phase.CLOSED
        return Closing(f"login not completed in {limit_s:g} s")

    @property
    def tick_interval_s(self) -> float:
        return max(0.05, min(self.config.nop_in_interval_s, self.config.nop_in_timeout_s) / 4)

    def next_event(self) -> Event | _NeedData:
        while not self._events:
            if self.phase is Phase.CLOSED:
                return NEED_DATA
            pdu = self.reader.next_pdu()
            if pdu is None:
                return NEED_DATA
            self._handle(pdu)
        return self._events.pop(0)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        return out

    @property
    def bytes_to_send(self) -> int:
        """What data_to_send() would return now, in bytes (READ data waiting to go)."""
        return self._out_bytes

    @property
    def outstanding_tasks(self) -> int:
        return len(self._tasks)

    @property
    def held_write_bytes(self) -> int:
        """Write data this connection holds (buffered, or in a WriteRequest not answered)."""
        return self._held_bytes

    def read_done(self, itt: int, data: bytes) -> None:
        task = self._finish(itt, (_READ,))
        if task is not None:
            self._send_data_in(task, data, _GOOD)

    def write_done(self, itt: int) -> None:
        """A WriteRequest, UnmapRequest or WriteSameRequest is done."""
        task = self._finish(itt, scsi.DATA_OUT_KINDS)
        if task is not None:
            assert task.io is not None
            self._send_response(task, scsi.Reply(_GOOD), transferred=task.io.length)

    def flush_done(self, itt: int) -> None:
        task = self._finish(itt, (_FLUSH,))
        if task is not None:
            self._send_response(task, scsi.Reply(_GOOD))

    def io_failed(self, itt: int) -> None:
        task = self._finish(itt, None)
        if task is not None:
            kind = task.io.kind if task.io else _READ
            error = scsi.READ_ERROR if kind is _READ else scsi.WRITE_ERROR
            self._send_response(task, scsi.check_condition(error))

    def io_refused(self, itt: int, sense: tuple[int, int, int]) -> None:
        """The adapter will not do an I/O the core let through (a LUN made read-only while
        a write's data arrived): CHECK CONDITION with ``sense``, nothing transferred."""
        task = self._finish(itt, None)
        if task is not None:
            self._send_response(task, scsi.check_condition(sense))

    def _finish(self, itt: int, kinds: Collection[scsi.IoKind] | None) -> _Task | None:
        """The task whose I/O the adapter has done, or None when a TMF aborted it meanwhile
        (its answer is dropped, and a TMF response waiting for it may now go out)."""
        task = self._tasks.get(itt)
        if task is None or not task.in_flight or task.io is None:
            raise LocalProtocolError(f"no I/O outstanding with ITT 0x{itt:08x}")
        if kinds is not None and task.io.kind not in kinds:
            what = "/".join(kind.value for kind in kinds)
            raise LocalProtocolError(f"no {what} outstanding with ITT 0x{itt:08x}")
        self._drop_task(task)
        if self._r2t_queue:  # its write data is no longer held: room for those waiting
            self._grant_waiting_writes()
        if not task.aborted:
            return task
        for pending in self._pending_tmfs:
            pending.waiting.discard(itt)
        while self._pending_tmfs and not self._pending_tmfs[0].waiting:
            done = self._pending_tmfs.pop(0)
            self._send_tmf_response(done.itt, done.response)
        return None

    # -- dispatch -----------------------------------------------------------------------

    def _handle(self, pdu: Pdu) -> None:
        if self.phase is Phase.LOGIN:
            if pdu.opcode != Op.LOGIN_REQ:
                raise RemoteProtocolError(f"opcode 0x{pdu.opcode:02x} before login completed")
            self._login(pdu)
            return
        handler = self._handlers.get(pdu.opcode)
        if handler is None:
            self._reject(pdu, REJECT_COMMAND_NOT_SUPPORTED)
            return
        handler(pdu)
        if self._r2t_queue:
            self._grant_waiting_writes()

    def _send(self, pdu: Pdu) -> None:
        header_digest, data_digest = self._digests
        encoded = encode_pdu(pdu, header_digest=header_digest, data_digest=data_digest)
        self._out.append(encoded)
        self._out_bytes += len(encoded)

    @property
    def _burst_bytes(self) -> int:
        """MaxBurstLength as used: an initiator that never sent the key has the RFC default
        (256 KiB), and a smaller R2T or Data-In sequence is always allowed."""
        return min(self.params.max_burst_bytes, self.config.limits.max_burst_bytes)

    def _max_cmd_sn(self) -> int:
        return (self.exp_cmd_sn + self.config.cmd_window - self._queued_tasks - 1) & 0xFFFFFFFF

    # -- the tasks held and the write data they hold --------------------------------------

    def _add_task(self, task: _Task) -> None:
        if task.itt in self._tasks:
            return
        self._tasks[task.itt] = task
        if task.immediate:
            self._immediate_tasks += 1
        else:
            self._queued_tasks += 1

    def _drop_task(self, task: _Task) -> None:
        if self._tasks.pop(task.itt, None) is None:
            return
        if task.immediate:
            self._immediate_tasks -= 1
        else:
            self._queued_tasks -= 1
        self._hold(task, 0)
        task.granted = task.waiting_for_room = False

    def _hold(self, task: _Task, nbytes: int) -> None:
        self._held_bytes += nbytes - task.held_bytes
        task.held_bytes = nbytes

    def _room_for(self, task: _Task) -> bool:
        """Whether ``task`` may take all the write data it still wants now: within the
        budget, or over it when no other write is granted or in flight (one always goes on,
        whatever unsolicited data the waiting ones hold)."""
        wanted = task.expected_bytes - task.held_bytes
        if self._held_bytes + wanted <= self.config.write_buffer_bytes_max:
            return True
        return not any(other.granted or other.in_flight for other in self._tasks.values())

    def _grant_waiting_writes(self) -> None:
        """R2Ts for the writes waiting for room, in arrival order, while there is room."""
        queue = self._r2t_queue
        while queue:
            task = self._tasks.get(queue[0])
            if task is None or not task.waiting_for_room:
                queue.popleft()  # answered or aborted meanwhile
                continue
            if not self._room_for(task):
                return
            queue.popleft()
            task.waiting_for_room = False
            self._grant(task)
            self._write_progress(task)

    def _grant(self, task: _Task) -> None:
        task.granted = True
        self._hold(task, task.expected_bytes)

    def _status_fields(
        self, *, tag: int = 0, word4: int = 0, word5: int = 0, word6: int = 0
    ) -> bytes:
        """Bytes 20..47 of a response: a tag, the next StatSN, ExpCmdSN and MaxCmdSN, then
        three words the opcode gives meaning to (RFC 7143's layout for every response)."""
        return pack_fields(
            tag, self._next_stat_sn(), self.exp_cmd_sn, self._max_cmd_sn(), word4, word5, word6
        )

    def _next_stat_sn(self) -> int:
        value = self.stat_sn
        self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
        return value

    def _accept_cmd_sn(self, pdu: Pdu) -> bool:
        """Whether a command is in the window; a non-immediate one advances ExpCmdSN."""
        cmd_sn = pdu.field32(24)
        if pdu.immediate:
            return True
        if cmd_sn != self.exp_cmd_sn or not _serial_le(cmd_sn, self._max_cmd_sn()):
            return False  # RFC 7143 4.2.2.1: outside the window is silently ignored
        self.exp_cmd_sn = (self.exp_cmd_sn + 1) & 0xFFFFFFFF
        return True

    def _reject(self, pdu: Pdu, reason: int) -> None:
        self._send(
            Pdu(
                Op.REJECT,
                flags=FLAG_FINAL,
                spec2=reason,
                itt=RESERVED_TAG,
                opcode_specific=pack_fields(
                    0, self.stat_sn, self.exp_cmd_sn, self._max_cmd_sn(), 0, 0, 0
                ),
                data=pdu.bhs(),
            )
        )

    # -- login --------------------------------------------------------------------------

    def _login(self, pdu: Pdu) -> None:
        transit, cont = bool(pdu.flags & _LOGIN_TRANSIT), bool(pdu.flags & _CONTINUE)
        csg, nsg = (pdu.flags >> 2) & 0x3, pdu.flags & 0x3
        if transit and cont:
            raise RemoteProtocolError("Login Request with both T and C set")
        if self._stage == -1:
            self._first_login(pdu)
            if self.phase is Phase.CLOSED:
                return
        elif pdu.lun_or_isid[:6] != self._isid:
            raise RemoteProtocolError("ISID changed during login")
        if csg not in (SECURITY, OPERATIONAL) or (self._stage >= 0 and csg != self._stage):
            self._login_fail(
                pdu, LOGIN_INITIATOR_ERROR, f"login stage {csg}, expected {self._stage}"
            )
            return
        if transit and (nsg <= csg or nsg == 2):
            self._login_fail(pdu, LOGIN_INITIATOR_ERROR, f"login transition {csg} -> {nsg}")
            return
        self._stage = csg
        self._login_text += pdu.data
        if len(self._login_text) > MAX_TEXT_BYTES:
            raise RemoteProtocolError("login text keys too long")
        if cont:  # more of the same text to come: acknowledge with an empty response
            self._login_response(pdu, csg, None, b"")
            return
        pairs = parse_text(bytes(self._login_text))
        self._login_text.clear()
        self._login_keys(pdu, csg, nsg if transit else None, pairs)

    def _first_login(self, pdu: Pdu) -> None:
        self._isid = pdu.lun_or_isid[:6]
        self.exp_cmd_sn = pdu.field32(24)
        self.stat_sn = pdu.field32(28)  # the initiator's ExpStatSN
        version_max, version_min = pdu.spec2, pdu.spec3
        if version_min > 0 or version_max < 0:
            self._login_fail(
                pdu, LOGIN_UNSUPPORTED_VERSION, f"version {version_min}..{version_max}"
            )
            return
        if int.from_bytes(pdu.lun_or_isid[6:8], "big") != 0:
            self._login_fail(pdu, LOGIN_NO_SESSION, "session reinstatement is not supported")
            return
        self._stage = (pdu.flags >> 2) & 0x3

    def _login_keys(self, pdu: Pdu, csg: int, nsg: int | None, pairs: Pairs) -> None:
        auth_keys = [(k, v) for k, v in pairs if k == "AuthMethod" or k.startswith("CHAP_")]
        try:
            reply = self.negotiator.answer([pair for pair in pairs if pair not in auth_keys])
        except RemoteProtocolError as exc:
            self._login_fail(pdu, LOGIN_INITIATOR_ERROR, str(exc))
            return
        if csg != SECURITY and not self._authenticated:
            self._login_fail(pdu, LOGIN_AUTH_FAILED, "CHAP is required: no security stage")
            return
        if csg == SECURITY or self._chap is None:  # without CHAP, AuthMethod=None anywhere
            try:
                reply += self._authenticate(dict(auth_keys))
            except ChapError as exc:
                self._login_fail(pdu, LOGIN_AUTH_FAILED, str(exc))
                return
            if not self._authenticated:
                nsg = None  # stay in the security stage until CHAP is done
        elif auth_keys:
            self._login_fail(pdu, LOGIN_INITIATOR_ERROR, "authentication keys after security")
            return
        params = self.params
        if self._first_login_response:
            if not params.initiator_name:
                self._login_fail(pdu, LOGIN_MISSING_PARAMETER, "no InitiatorName")
                return
            if params.session_type == "Normal":
                if params.target_name != self.config.iqn:
                    self._login_fail(pdu, LOGIN_NOT_FOUND, f"no target {params.target_name!r}")
                    return
                reply.append(("TargetPortalGroupTag", str(self.config.portal_group)))
        if csg == OPERATIONAL or nsg == FULL_FEATURE:
            reply.extend(self.negotiator.own_declarations())
        self._login_response(pdu, csg, nsg, encode_text(reply))
        if nsg is not None:
            self._stage = nsg
        if nsg == FULL_FEATURE:
            self._enter_full_feature()

    def _authenticate(self, keys: dict[str, str]) -> Pairs:
        """The security stage's auth keys: AuthMethod=None when no CHAP is configured;
        otherwise AuthMethod=CHAP, then CHAP_A, then CHAP_N/CHAP_R (chap.py)."""
        if "AuthMethod" in keys:
            offered = [method.strip() for method in keys.pop("AuthMethod").split(",")]
            if self._chap is None:
                if "None" not in offered:
                    raise ChapError(f"AuthMethod {','.join(offered)[:64]}: only None here")
                return [("AuthMethod", "None")]
            if "CHAP" not in offered:
                raise ChapError(f"CHAP is required; AuthMethod {','.join(offered)[:64]}")
            return [("AuthMethod", "CHAP")]
        if self._chap is None:
            if keys:
                raise ChapError("CHAP keys without CHAP configured")
            return []
        if "CHAP_A" in keys:
            return self._chap.challenge(keys)
        if "CHAP_R" in keys or "CHAP_N" in keys:
            reply = self._chap.verify(keys)
            self._authenticated = True
            return reply
        return []

    def _login_response(
        self,
        pdu: Pdu,
        csg: int,
        nsg: int | None,
        data: bytes,
        status: tuple[int, int] = LOGIN_OK,
    ) -> None:
        flags = (csg << 2) | ((_LOGIN_TRANSIT | nsg) if nsg is not None else 0)
        done = nsg == FULL_FEATURE and status == LOGIN_OK
        isid_tsih = self._isid + struct.pack(">H", self.tsih if done else 0)
        stat_sn = self._next_stat_sn()
        self._first_login_response = False
        self._send(
            Pdu(
                Op.LOGIN_RSP,
                flags=flags,
                lun_or_isid=isid_tsih,
                itt=pdu.itt,
                opcode_specific=pack_fields(
                    0,
                    stat_sn,
                    self.exp_cmd_sn,
                    self._max_cmd_sn(),
                    (status[0] << 24) | (status[1] << 16),
                    0,
                    0,
                ),
                data=data,
            )
        )

    def _login_fail(self, pdu: Pdu, status: tuple[int, int], why: str) -> None:
        csg = max(self._stage, 0) if self._stage != FULL_FEATURE else OPERATIONAL
        self._isid = pdu.lun_or_isid[:6]
        self._login_response(pdu, csg, None, b"", status)
        self._close(f"login refused: {why}", authentication_failed=status == LOGIN_AUTH_FAILED)

    def _enter_full_feature(self) -> None:
        self.phase = Phase.FULL_FEATURE
        self.reader.header_digest = self.params.header_digest
        self.reader.data_digest = self.params.data_digest
        self._digests = (self.params.header_digest, self.params.data_digest)
        self._events.append(
            LoggedIn(self.params.session_type, self.params.initiator_name, self.params)
        )

    def _close(self, why: str, *, authentication_failed: bool = False) -> None:
        self.phase = Phase.CLOSED
        self._events.append(Closing(why, authentication_failed))

    # -- full feature phase: text, NOP, logout, task management ---------------------------

    def _text(self, pdu: Pdu) -> None:
        if pdu.flags & _CONTINUE or pdu.field32(20) != RESERVED_TAG:
            raise RemoteProtocolError("continued Text Requests are not supported")
        if not self._accept_cmd_sn(pdu):
            return
        reply: Pairs = []
        for key, value in parse_text(pdu.data):
            if key == "SendTargets":
                reply.extend(self._send_targets(value))
            else:
                reply.append((key, "NotUnderstood"))
        data = encode_text(reply)
        if len(data) > self.params.initiator_recv_data_segment_bytes:
            raise LocalProtocolError("text response larger than the initiator accepts")
        self._answer(pdu, Op.TEXT_RSP, data)

    def _answer(self, request: Pdu, op: Op, data: bytes) -> None:
        """A one-PDU answer to ``request`` (Text, NOP-Out): its ITT and LUN, no TTT."""
        self._send(
            Pdu(
                op,
                flags=FLAG_FINAL,
                lun_or_isid=request.lun_or_isid,
                itt=request.itt,
                opcode_specific=self._status_fields(tag=RESERVED_TAG),
                data=data,
            )
        )

    def _send_targets(self, value: str) -> Pairs:
        iqn = self.config.iqn
        wanted = value == "All" if self.params.session_type == "Discovery" else value in ("", iqn)
        if not (wanted or value == iqn):
            return []
        return [
            ("TargetName", iqn),
            ("TargetAddress", f"{self.config.portal},{self.config.portal_group}"),
        ]

    def _nop_out(self, pdu: Pdu) -> None:
        if pdu.itt == RESERVED_TAG:  # no answer wanted: a reply to our ping, or a ping
            if self._ping is not None and pdu.field32(20) == self._ping[0]:
                self._ping = None
            return
        if not self._accept_cmd_sn(pdu):
            return
        self._answer(pdu, Op.NOP_IN, pdu.data)

    def _logout(self, pdu: Pdu) -> None:
        if not self._accept_cmd_sn(pdu):
            return
        reason = pdu.flags & 0x7F
        response = 0 if reason in (0, 1) else 2  # 2: connection recovery not supported
        self._send(
            Pdu(
                Op.LOGOUT_RSP,
                flags=FLAG_FINAL,
                spec2=response,
                itt=pdu.itt,
                opcode_specific=self._status_fields(
                    word5=(self.params.default_time2wait_s << 16)
                    | self.params.default_time2retain_s
                ),
            )
        )
        self._close("logout")

    def _send_ping(self, now_s: float) -> None:
        """A NOP-In asking for a NOP-Out (RFC 7143 11.19: ITT reserved, a TTT, the StatSN
        not advanced)."""
        ttt = self._new_ttt()
        self._ping = (ttt, now_s)
        self._send(
            Pdu(
                Op.NOP_IN,
                flags=FLAG_FINAL,
                itt=RESERVED_TAG,
                opcode_specific=pack_fields(
                    ttt, self.stat_sn, self.exp_cmd_sn, self._max_cmd_sn(), 0, 0, 0
                ),
            )
        )

    def _task_management(self, pdu: Pdu) -> None:
        """RFC 7143 11.5: aborted tasks get no SCSI response; the TMF response waits for
        the adapter to answer the aborted I/O it still holds (see _PendingTmf)."""
        if not self._accept_cmd_sn(pdu):
            return
        function = pdu.flags & 0x7F
        lun = scsi.decode_lun(pdu.lun_or_isid)
        affected: list[_Task] = []
        if function == TMF_ABORT_TASK:
            response, affected = self._abort_task_lookup(pdu)
        elif function in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET):
            # one session a connection and one connection a session: the task set of the
            # LUN as this core sees it is every task of this connection on that LUN
            response = TMF_COMPLETE if lun in self.config.luns else TMF_NO_LUN
            affected = [task for task in self._tasks.values() if task.lun == lun]
        elif function == TMF_TARGET_WARM_RESET:
            response, affected = TMF_COMPLETE, list(self._tasks.values())
        elif function == TMF_TASK_REASSIGN:
            response = TMF_REASSIGN_NOT_SUPPORTED  # ErrorRecoveryLevel 0
        else:
            response = TMF_NOT_SUPPORTED
        if response != TMF_COMPLETE:
            affected = []
        waiting = {task.itt for task in affected if task.in_flight}
        for task in affected:
            self._abort(task)
        if waiting:
            self._pending_tmfs.append(_PendingTmf(pdu.itt, response, waiting))
        else:
            self._send_tmf_response(pdu.itt, response)

    def _abort_task_lookup(self, pdu: Pdu) -> tuple[int, list[_Task]]:
        task = self._tasks.get(pdu.field32(20))  # Referenced Task Tag
        if task is not None:  # (aborted already and in flight: this TMF waits for it too)
            return TMF_COMPLETE, [task]
        # RFC 7143 11.6.1: a task we never got whose RefCmdSN is still in the window and
        # before the TMF's own CmdSN is taken as received (and so done with); else none
        ref_cmd_sn, cmd_sn = pdu.field32(32), pdu.field32(24)
        in_window = _serial_le(self.exp_cmd_sn, ref_cmd_sn) and _serial_le(
            ref_cmd_sn, self._max_cmd_sn()
        )
        if in_window and ref_cmd_sn != cmd_sn and _serial_le(ref_cmd_sn, cmd_sn):
            if ref_cmd_sn == self.exp_cmd_sn:
                self.exp_cmd_sn = (self.exp_cmd_sn + 1) & 0xFFFFFFFF
            return TMF_COMPLETE, []
        return TMF_NO_TASK, []

    def _abort(self, task: _Task) -> None:
        if task.in_flight:
            task.aborted = True  # stays until the adapter answers; its answer is dropped
            return
        self._drop_task(task)
        if task.unsolicited_open or task.ttt != RESERVED_TAG:
            self._aborted_itts[task.itt] = None  # Data-Out may still be on its way
            while len(self._aborted_itts) > 2 * (self.config.cmd_window + MAX_IMMEDIATE_TASKS):
                self._aborted_itts.popitem(last=False)

    def _send_tmf_response(self, itt: int, response: int) -> None:
        self._send(
            Pdu(
                Op.TASK_MGMT_RSP,
                flags=FLAG_FINAL,
                spec2=response,
                itt=itt,
                opcode_specific=self._status_fields(),
            )
        )

    # -- SCSI ---------------------------------------------------------------------------

    def _scsi_command(self, pdu: Pdu) -> None:
        if self.params.session_type != "Normal":
            self._reject(pdu, REJECT_PROTOCOL_ERROR)
            return
        if pdu.itt in self._tasks or pdu.itt == RESERVED_TAG:
            self._reject(pdu, REJECT_INVALID_FIELD)
            return
        if pdu.immediate and self._immediate_tasks >= MAX_IMMEDIATE_TASKS:
            self._reject(pdu, REJECT_IMMEDIATE)
            return
        if not self._accept_cmd_sn(pdu):
            return
        writes = bool(pdu.flags & _SCSI_FLAG_WRITE)
        if pdu.data and not (self.params.immediate_data and writes):
            raise RemoteProtocolError("immediate data not negotiated or not a write")
        if len(pdu.data) > min(self.params.first_burst_bytes, pdu.field32(20)):
            raise RemoteProtocolError("immediate data beyond FirstBurstLength or the transfer")
        if not pdu.final and (self.params.initial_r2t or not writes):
            raise RemoteProtocolError("SCSI Command without F bit: no unsolicited Data-Out here")
        self._aborted_itts.pop(pdu.itt, None)  # the ITT names a new task from now on
        lun = scsi.decode_lun(pdu.lun_or_isid)
        task = _Task(pdu.itt, lun, pdu.field32(20), pdu.immediate, received=len(pdu.data))
        task.unsolicited_open = not pdu.final
        task.unsolicited_end = min(self.params.first_burst_bytes, task.expected_bytes)
        result = scsi.execute(pdu.opcode_specific[12:28], lun, self.config.luns)
        if isinstance(result, scsi.Io):
            self._start_io(task, result, pdu)
        elif task.unsolicited_open:
            self._answer_after_data(task, result, None)
        elif result.status == _GOOD and result.data and pdu.flags & _SCSI_FLAG_READ:
            self._send_data_in(task, result.data, result.status)
        else:
            self._send_response(task, result)

    def _answer_after_data(self, task: _Task, reply: scsi.Reply, transferred: int | None) -> None:
        """Answer now, or once the Data-Out sequence the initiator is in ends."""
        if not task.unsolicited_open and task.ttt == RESERVED_TAG:
            self._drop_task(task)
            self._send_response(task, reply, transferred)
            return
        task.pending = (reply, transferred)
        task.buffer = bytearray()
        self._add_task(task)
        self._hold(task, 0)  # what still comes is dropped
        task.granted = False

    def _start_io(self, task: _Task, io: scsi.Io, pdu: Pdu) -> None:
        reads, writes = bool(pdu.flags & _SCSI_FLAG_READ), bool(pdu.flags & _SCSI_FLAG_WRITE)
        fitted = scsi.fit_data_out(io, task.expected_bytes)
        if fitted is None:
            self._answer_after_data(task, scsi.check_condition(scsi.INVALID_FIELD_IN_CDB), None)
            return
        task.io = io = fitted
        if io.kind is _READ and io.length and not reads:
            # The initiator expects no Data-In: what it sent is dropped and, as for a READ
            # with an Expected Data Transfer Length of 0, nothing is read and the whole
            # length is an overflow residual (RFC 7143 11.4.5.1)
            task.expected_bytes = 0
            self._answer_after_data(task, scsi.Reply(_GOOD), io.length)
            return
        wants_write = io.kind in scsi.DATA_OUT_KINDS
        if wants_write and io.length and (reads or not writes):
            self._answer_after_data(task, scsi.check_condition(scsi.INVALID_FIELD_IN_CDB), None)
            return
        if wants_write and task.expected_bytes > scsi.MAX_TRANSFER_BYTES:
            self._answer_after_data(task, scsi.check_condition(scsi.INVALID_FIELD_IN_CDB), None)
            return
        if io.kind not in (_FLUSH, _WRITE_SAME) and io.length == 0:
            self._answer_after_data(task, scsi.Reply(_GOOD), None)
            return
        self._add_task(task)
        if io.kind is _READ:
            task.in_flight = True
            self._events.append(ReadRequest(task.itt, task.lun, io.offset, io.length))
        elif io.kind is _FLUSH:
            task.in_flight = True
            self._events.append(FlushRequest(task.itt, task.lun))
        else:
            # Everything the initiator means to send is taken (ExpectedDataTransferLength,
            # bounded above); the whole blocks of it that the CDB asks for are written and
            # the difference is a residual (RFC 7143 11.4.5). The buffer grows as data
            # comes: room is made for what R2Ts ask for, not for what a CDB announces.
            task.buffer = bytearray(pdu.data)
            self._hold(task, len(task.buffer))
            self._write_progress(task)

    def _write_progress(self, task: _Task) -> None:
        assert task.io is not None
        if task.unsolicited_open:
            return  # R2Ts only once the unsolicited data has ended (F bit)
        if task.received == task.expected_bytes and task.io.kind is not _WRITE:
            self._parameters_received(task)
            return
        if task.received == task.expected_bytes:
            write_bytes = min(task.expected_bytes, task.io.length)
            write_bytes -= write_bytes % scsi.BLOCK_BYTES
            buffer, task.buffer = task.buffer, bytearray()
            data = bytes(buffer) if write_bytes == len(buffer) else bytes(buffer[:write_bytes])
            if not write_bytes:
                self._drop_task(task)
                self._send_response(task, scsi.Reply(_GOOD), task.io.length)
                return
            task.in_flight = True
            self._events.append(WriteRequest(task.itt, task.lun, task.io.offset, data, task.io.fua))
            return
        if not task.granted:
            if self._r2t_queue or not self._room_for(task):  # (others wait: after them)
                task.waiting_for_room = True
                self._r2t_queue.append(task.itt)
                return
            self._grant(task)
        want = min(self._burst_bytes, task.expected_bytes - task.received)
        task.ttt = self._new_ttt()
        task.r2t_end = task.received + want
        task.data_sn = 0
        self._send(
            Pdu(
                _R2T,
                flags=FLAG_FINAL,
                lun_or_isid=scsi.encode_lun(task.lun),
                itt=task.itt,
                opcode_specific=pack_fields(
                    task.ttt,
                    self.stat_sn,
                    self.exp_cmd_sn,
                    self._max_cmd_sn(),
                    task.r2t_sn,
                    task.received,
                    want,
                ),
            )
        )
        task.r2t_sn += 1

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (self._next_ttt + 1) % RESERVED_TAG or 1
        return ttt

    def _parameters_received(self, task: _Task) -> None:
        """UNMAP's parameter list or WRITE SAME's block is in: scsi says what it asks for."""
        assert task.io is not None
        data = bytes(task.buffer[: task.io.length])
        task.buffer = bytearray()
        action = scsi.parameters_received(task.io, data, self.config.luns[task.lun])
        if isinstance(action, scsi.Reply):
            self._drop_task(task)
            self._send_response(task, action, transferred=task.io.length)
        elif isinstance(action, scsi.Unmap):
            task.in_flight = True
            self._events.append(UnmapRequest(task.itt, task.lun, action.extents))
        else:
            task.in_flight = True
            self._events.append(
                WriteSameRequest(task.itt, task.lun, action.offset, action.length, action.block)
            )

    def _data_out(self, pdu: Pdu) -> None:
        """Data-Out answering an R2T (its TTT) or unsolicited (TTT reserved, InitialR2T=No,
        up to FirstBurstLength). A DataSN out of sequence means a PDU was lost: at
        ErrorRecoveryLevel 0 the command ends with CHECK CONDITION "protocol service CRC
        error" once the sequence ends (RFC 7143's digest and sequence errors), and the
        session goes on; a broken offset or F bit is a protocol error (connection closed)."""
        task = self._tasks.get(pdu.itt)
        ttt = pdu.field32(20)
        if task is None or task.in_flight:
            if pdu.itt in self._aborted_itts:  # the rest of an aborted write: dropped
                return
            raise RemoteProtocolError(f"Data-Out for no open transfer (ITT 0x{pdu.itt:08x})")
        if ttt == RESERVED_TAG and task.unsolicited_open:
            end = task.unsolicited_end
        elif ttt != RESERVED_TAG and ttt == task.ttt:
            end = task.r2t_end
        else:
            raise RemoteProtocolError(
                f"Data-Out TTT 0x{ttt:08x} matches no open sequence (ITT 0x{pdu.itt:08x})"
            )
        if task.pending is None:
            self._take_data(task, pdu, end)
        task.data_sn += 1
        if not pdu.final:
            return
        if ttt == RESERVED_TAG:
            task.unsolicited_open = False
        else:
            task.ttt = RESERVED_TAG
        task.data_sn = 0
        if task.pending is not None:
            reply, transferred = task.pending
            self._drop_task(task)
            self._send_response(task, reply, transferred)
            return
        self._write_progress(task)

    def _take_data(self, task: _Task, pdu: Pdu, end: int) -> None:
        offset, data_sn = pdu.field32(40), pdu.field32(36)
        if data_sn != task.data_sn:
            self._answer_after_data(task, scsi.check_condition(PROTOCOL_SERVICE_CRC_ERROR), None)
            return
        unsolicited = pdu.field32(20) == RESERVED_TAG
        if unsolicited and offset == task.received and offset + len(pdu.data) > end:
            self._answer_after_data(task, scsi.check_condition(UNEXPECTED_UNSOLICITED_DATA), None)
            return
        if offset != task.received or offset + len(pdu.data) > end:
            raise RemoteProtocolError(
                f"Data-Out at {offset}+{len(pdu.data)} outside the sequence {task.received}..{end}"
            )
        task.buffer += pdu.data  # offset == task.received: the buffer grows in order
        task.received += len(pdu.data)
        if task.received > task.held_bytes:  # unsolicited data: counted as it comes
            self._hold(task, task.received)
        if pdu.final != (task.received == end) and not (unsolicited and pdu.final):
            raise RemoteProtocolError("Data-Out F bit does not end the R2T's data")

    def _send_data_in(self, task: _Task, data: bytes, status: scsi.Status) -> None:
        flags, residual = self._residual(task.expected_bytes, len(data))
        if task.expected_bytes == 0:  # nothing may go in Data-In: a response with overflow
            self._send_response(task, scsi.Reply(status), transferred=len(data))
            return
        data = data[: task.expected_bytes]
        step = self.params.initiator_recv_data_segment_bytes
        burst = self._burst_bytes
        # (offset, end) of each PDU: none crosses a MaxBurstLength boundary, and the F bit
        # ends each burst (a Data-In sequence, RFC 7143 11.7.1)
        chunks = (
            [
                (at, min(at + step, start + burst, len(data)))
                for start in range(0, len(data), burst)
                for at in range(start, min(start + burst, len(data)), step)
            ]
            if len(data) > min(step, burst)
            else [(0, len(data))]
        )  # (a small read: one PDU)
        lun = scsi.encode_lun(task.lun)
        for data_sn, (offset, end) in enumerate(chunks):
            last = data_sn == len(chunks) - 1
            burst_end = end % burst == 0
            pdu_flags = (FLAG_FINAL | _DATA_IN_STATUS | flags) if last else 0
            pdu_flags |= FLAG_FINAL if burst_end else 0
            self._send(
                Pdu(
                    _DATA_IN,
                    flags=pdu_flags,
                    spec3=status if last else 0,
                    lun_or_isid=lun,
                    itt=task.itt,
                    opcode_specific=pack_fields(
                        RESERVED_TAG,
                        self._next_stat_sn() if last else 0,
                        self.exp_cmd_sn,
                        self._max_cmd_sn(),
                        data_sn,
                        offset,
                        residual if last else 0,
                    ),
                    data=data[offset:end],
                )
            )

    @staticmethod
    def _residual(expected: int, actual: int) -> tuple[int, int]:
        if actual > expected:
            return _RESIDUAL_OVERFLOW, actual - expected
        if actual < expected:
            return _RESIDUAL_UNDERFLOW, expected - actual
        return 0, 0

    def _send_response(
        self, task: _Task, reply: scsi.Reply, transferred: int | None = None
    ) -> None:
        data = struct.pack(">H", len(reply.sense)) + reply.sense if reply.sense else b""
        flags, residual = 0, 0
        if reply.status == _GOOD:
            actual = len(reply.data) if transferred is None else transferred
            flags, residual = self._residual(task.expected_bytes, actual)
        self._send(
            Pdu(
                _SCSI_RSP,
                flags=FLAG_FINAL | flags,
                spec2=0,  # command completed at target
                spec3=reply.status,
                itt=task.itt,
                opcode_specific=self._status_fields(word6=residual),
                data=data,
            )
        )
