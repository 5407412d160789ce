"""Sans-I/O read-journal connection: bytes in, messages out, framed bytes back.

    secondary (pulls)                                   primary (serves)
    HELLO    ── Hello ────────────────────────────────► HELLO
    WELCOME  ◄────────────────────── Welcome | Refuse  WELCOME ─► IDLE | CLOSED
             ◄──────────────────────────────── Swapped  WELCOME ─► CLOSED
             (a swap made that site the secondary)
    IDLE     ── ReadJournal(from_seq, restored_seq) ──► IDLE ─► WAITING
    WAITING  ◄──────────────────── JournalBatch | Refuse  WAITING ─► IDLE | CLOSED
             (count 0 = the long poll timed out)
    IDLE     ── ReportBitmap(volume, bitmap) ─────────► IDLE ─► WAITING
    WAITING  ◄───────────────────── BitmapTaken | Refuse  WAITING ─► IDLE | CLOSED
    IDLE     ── SwapRequest(kind) ────────────────────► IDLE ─► WAITING
    WAITING  ◄──────────────────────── SwapAnswer | Refuse  WAITING ─► IDLE | CLOSED

Both ends run the same class; `side` says which one we are. Frame = 4-byte big-endian length
+ one msgpack map (see messages). Request/response only: at most one frame is ever in flight
from a well-behaved peer, which is what lets the receive buffer be bounded by one frame.
No sockets, no clock, no disk: the long-poll timer (max_wait_ms) belongs to the caller.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Final, NoReturn

from common.replication.messages import (
    MAX_BATCH_ENVELOPE_BYTES,
    MESSAGE_TYPES,
    U32_MAX,
    BitmapTaken,
    Hello,
    JournalBatch,
    LocalProtocolError,
    Message,
    ReadJournal,
    Refuse,
    RemoteProtocolError,
    ReportBitmap,
    SwapAnswer,
    Swapped,
    SwapRequest,
    Welcome,
    decode,
    encode_chunks,
)

__all__ = [
    "NEED_DATA",
    "ConnectionClosed",
    "Event",
    "Limits",
    "LocalProtocolError",
    "NeedData",
    "RemoteProtocolError",
    "ReplicationConnection",
    "Side",
    "State",
]

_MiB: Final = 1 << 20
_PREFIX: Final = struct.Struct(">I")


class Side(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class State(enum.Enum):
    """Where the conversation is; both ends agree on it once a frame has arrived."""

    HELLO = enum.auto()  # the secondary owes Hello
    WELCOME = enum.auto()  # Hello sent: the primary owes Welcome, Refuse or Swapped
    IDLE = enum.auto()  # paired: the secondary may send one ReadJournal
    WAITING = enum.auto()  # one ReadJournal outstanding: the primary owes JournalBatch or Refuse
    CLOSED = enum.auto()  # Refuse or Swapped passed, or the peer closed
    ERROR = enum.auto()  # the peer broke the protocol; only the primary's last Refuse may follow


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one connection accepts; both ends are expected to run the same limits.

    A batch's records stay within the request's max_bytes, except that a batch of exactly one
    record may be as large as max_record_bytes (so a 32 MiB write still gets through to a
    secondary that asked for less). max_frame_bytes is derived from these, so a configuration
    cannot allow a batch that does not fit a frame.
    """

    max_batch_entries: int = 65536
    max_batch_bytes: int = 64 * _MiB  # the most a ReadJournal may ask for
    # One encoded journal record: a 32 MiB write (the NBD maximum) plus header and volume name.
    max_record_bytes: int = 32 * _MiB + 4096
    max_wait_ms: int = 60_000
    # Hello, ReadJournal: what a primary buffers per connection, whatever a peer sends.
    max_control_frame_bytes: int = 2 * _MiB

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or not 1 <= value <= U32_MAX:
                raise ValueError(f"Limits.{field.name} must be an integer in [1, {U32_MAX}]")

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame a secondary accepts: the largest legal batch plus its envelope."""
        return max(self.max_batch_bytes, self.max_record_bytes) + MAX_BATCH_ENVELOPE_BYTES


DEFAULT_LIMITS: Final = Limits()


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed cleanly between frames; `state` is where the conversation was."""

    state: State


Event = Message | ConnectionClosed

# Everything that moves the conversation, in one place; a missing entry is a protocol error.
_TRANSITIONS: Final[dict[tuple[State, type[Message]], State]] = {
    (State.HELLO, Hello): State.WELCOME,
    (State.WELCOME, Welcome): State.IDLE,
    (State.WELCOME, Refuse): State.CLOSED,
    (State.WELCOME, Swapped): State.CLOSED,
    (State.IDLE, ReadJournal): State.WAITING,
    (State.WAITING, JournalBatch): State.IDLE,
    (State.IDLE, ReportBitmap): State.WAITING,
    (State.WAITING, BitmapTaken): State.IDLE,
    (State.IDLE, SwapRequest): State.WAITING,
    (State.WAITING, SwapAnswer): State.IDLE,
    (State.WAITING, Refuse): State.CLOSED,
    (State.ERROR, Refuse): State.CLOSED,
}
_SENDER: Final[dict[type[Message], Side]] = {
    Hello: Side.SECONDARY,
    ReadJournal: Side.SECONDARY,
    Welcome: Side.PRIMARY,
    Refuse: Side.PRIMARY,
    JournalBatch: Side.PRIMARY,
    ReportBitmap: Side.SECONDARY,
    BitmapTaken: Side.PRIMARY,
    SwapRequest: Side.SECONDARY,
    SwapAnswer: Side.PRIMARY,
    Swapped: Side.PRIMARY,
}
_ProtocolError = type[LocalProtocolError] | type[RemoteProtocolError]


class ReplicationConnection:
    """One end of one replication connection, from Hello to close.

    The adapter feeds whatever the socket gave to receive_data() and calls next_event() until
    NEED_DATA; it writes what send() returns. The primary answers `request` while WAITING. After
    a RemoteProtocolError the connection is dead: a primary may still send
    Refuse(exc.refuse_code, ...) before closing; a secondary just closes.
    """

    def __init__(self, side: Side, limits: Limits = DEFAULT_LIMITS) -> None:
        self.side = side
        self.limits = limits
        self._peer = Side.PRIMARY if side is Side.SECONDARY else Side.SECONDARY
        # Batches flow to the secondary only, so the primary buffers at most a control frame.
        self._max_in = self._frame_limit(side)
        self._max_out = self._frame_limit(self._peer)
        self._state = State.HELLO
        self._buf = bytearray()
        self._pos = 0  # bytes of _buf already parsed; compacted on the next receive_data
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._hello: Hello | None = None
        self._request: ReadJournal | ReportBitmap | SwapRequest | None = None

    def _frame_limit(self, side: Side) -> int:
        if side is Side.SECONDARY:
            return self.limits.max_frame_bytes
        return self.limits.max_control_frame_bytes

    @property
    def state(self) -> State:
        return self._state

    @property
    def hello(self) -> Hello | None:
        """The Hello this connection carried, once sent or received."""
        return self._hello

    @property
    def request(self) -> ReadJournal | ReportBitmap | SwapRequest | None:
        """The outstanding request while WAITING (what the primary must answer)."""
        return self._request

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet parsed; never more than one incoming frame and its prefix."""
        return len(self._buf) - self._pos

    # -- receiving -----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; b"" means the peer closed (end of stream)."""
        if self._eof:
            raise LocalProtocolError("receive_data after the end of the stream")
        with memoryview(data) as view:
            if not view.nbytes:
                self._eof = True
            elif self._error is None:  # a failed connection is being closed: drop the rest
                self._append(view)

    def _append(self, view: memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if len(self._buf) + view.nbytes > _PREFIX.size + self._max_in:
            # A legal peer never has more than one frame in flight (request/response).
            self._fail(
                RemoteProtocolError(
                    f"peer sent {len(self._buf) + view.nbytes} bytes ahead, more than one "
                    f"frame of at most {self._max_in} bytes"
                )
            )
        self._buf += view

    def next_event(self) -> Event | NeedData:
        """Parse at most one frame: a message, NEED_DATA, or ConnectionClosed at a clean EOF."""
        if self._error is not None:
            raise RemoteProtocolError(
                f"connection already failed: {self._error}", self._error.refuse_code
            )
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._fail(exc)

    def _fail(self, exc: RemoteProtocolError) -> NoReturn:
        self._error = exc
        if self._state is not State.CLOSED:
            self._state = State.ERROR
        raise exc

    def _next_event(self) -> Event | NeedData:
        length = self._frame_length()
        if length is None or self.buffered_bytes < _PREFIX.size + length:
            return self._incomplete()
        message = self._take_frame(length)
        next_state = self._check(message, self._peer, RemoteProtocolError)
        self._commit(message, next_state)
        return message

    def _frame_length(self) -> int | None:
        if self.buffered_bytes < _PREFIX.size:
            return None
        (length,) = _PREFIX.unpack_from(self._buf, self._pos)
        # Refused on sight of the prefix: an oversize frame is never buffered.
        if length > self._max_in:
            raise RemoteProtocolError(f"frame of {length} bytes, at most {self._max_in}")
        return int(length)

    def _incomplete(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self.buffered_bytes:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({self.buffered_bytes} bytes)"
            )
        closed = ConnectionClosed(self._state)
        self._state = State.CLOSED
        return closed

    def _take_frame(self, length: int) -> Message:
        start = self._pos + _PREFIX.size
        # Decode straight from the buffer: the records blob is copied once, into its bytes.
        with memoryview(self._buf) as view, view[start : start + length] as body:
            message = decode(body, max_bin_bytes=self._max_in)
        self._pos = start + length
        if self._pos == len(self._buf):
            self._buf.clear()  # also gives a big batch's memory back
            self._pos = 0
        return message

    # -- sending -------------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Frame a message we may send now; LocalProtocolError if we may not."""
        if not isinstance(message, MESSAGE_TYPES):
            raise LocalProtocolError(f"not a replication message: {type(message).__name__}")
        next_state = self._check(message, self.side, LocalProtocolError)
        chunks = encode_chunks(message)
        length = sum(len(chunk) for chunk in chunks)
        if length > self._max_out:
            raise LocalProtocolError(f"{type(message).__name__} of {length} bytes over the limit")
        self._commit(message, next_state)
        return b"".join([_PREFIX.pack(length), *chunks])

    # -- the rules, for both directions ----------------------------------------------------------

    def _check(self, message: Message, sender: Side, error: _ProtocolError) -> State:
        name = type(message).__name__
        if _SENDER[type(message)] is not sender:
            raise error(f"{name} is sent by the {_SENDER[type(message)].value} only")
        next_state = _TRANSITIONS.get((self._state, type(message)))
        if next_state is None:
            raise error(f"{sender.value} sent {name} in state {self._state.name}")
        problem = self._exchange_problem(message)
        if problem is not None:
            raise error(f"{name}: {problem}")
        return next_state

    def _exchange_problem(self, message: Message) -> str | None:
        """What is wrong with a message given the one it answers (None: nothing)."""
        if isinstance(message, Welcome):
            assert self._hello is not None  # WELCOME is reached through Hello only
            if message.group != self._hello.group:
                return f"group {message.group!r} does not answer Hello's {self._hello.group!r}"
        if isinstance(message, ReadJournal):
            return _request_problem(message, self.limits)
        if isinstance(message, JournalBatch):
            if not isinstance(self._request, ReadJournal):
                return "answers no ReadJournal"
            return _batch_problem(message, self._request, self.limits)
        if isinstance(message, BitmapTaken):
            if not isinstance(self._request, ReportBitmap):
                return "answers no ReportBitmap"
            if message.volume != self._request.volume:
                return f"volume {message.volume!r} does not answer {self._request.volume!r}"
        if isinstance(message, SwapAnswer):
            if not isinstance(self._request, SwapRequest):
                return "answers no SwapRequest"
            if message.kind != self._request.kind:
                return f"kind {message.kind} does not answer {self._request.kind}"
        return None

    def _commit(self, message: Message, next_state: State) -> None:
        if isinstance(message, Hello):
            self._hello = message
        elif isinstance(message, ReadJournal | ReportBitmap | SwapRequest):
            self._request = message
        else:
            self._request = None
        self._state = next_state


def _request_problem(request: ReadJournal, limits: Limits) -> str | None:
    if request.max_entries > limits.max_batch_entries:
        return f"max_entries {request.max_entries} > limit {limits.max_batch_entries}"
    if request.max_bytes > limits.max_batch_bytes:
        return f"max_bytes {request.max_bytes} > limit {limits.max_batch_bytes}"
    if request.max_wait_ms > limits.max_wait_ms:
        return f"max_wait_ms {request.max_wait_ms} > limit {limits.max_wait_ms}"
    return None


def _batch_problem(batch: JournalBatch, request: ReadJournal, limits: Limits) -> str | None:
    if batch.first_seq != request.from_seq:
        return f"first_seq {batch.first_seq} does not answer from_seq {request.from_seq}"
    if batch.count > request.max_entries:
        return f"count {batch.count} > the request's max_entries {request.max_entries}"
    allowed = request.max_bytes
    if batch.count == 1:
        allowed = max(allowed, limits.max_record_bytes)
    if len(batch.records) > allowed:
        return f"{len(batch.records)} record bytes > the {allowed} allowed"
    return None
