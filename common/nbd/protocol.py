"""Sans-I/O NBD server connection: bytes in, events out, reply bytes queued.

    client bytes ─► receive_data() ─► next_event() ─► ExportChosen / Request / Disconnect
                                                       │ (the adapter does the I/O)
    data_to_send() ◄── reply_ok / reply_error / reply_read / reply_block_status

TLS (proto.md "TLS support"), when the adapter has a certificate:

    OPTIONS ── NBD_OPT_STARTTLS ─► ACK queued, event StartTls ─► TLS_HANDSHAKE
        (the adapter sends the ACK in plaintext, then runs the TLS handshake; any
         plaintext byte that reaches the core now is a protocol error)
    TLS_HANDSHAKE ── tls_established() ─► OPTIONS again, every byte through TLS

With TlsMode.REQUIRE every option but STARTTLS and ABORT is answered
NBD_REP_ERR_TLS_REQD until then (event TlsRequired), and NBD_OPT_EXPORT_NAME, which
cannot be answered with an error, closes the connection.

The core validates everything a peer can get wrong (magic, option lengths,
command flags, ranges, read-only, sizes) and answers those itself; a request
event always describes a valid operation. No clock, no disk, no await.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import NamedTuple

from common.nbd import constants as c


class RemoteProtocolError(Exception):
    """The client broke the protocol; the connection must be closed."""


class LocalProtocolError(Exception):
    """We misused the core (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool
    description: str = ""
    fast_zero: bool = True


@dataclass(frozen=True, slots=True)
class ExportChosen:
    export: ExportInfo


class Request(NamedTuple):
    """A valid request. A WRITE's payload is a view into the receive buffer: it is valid
    until the next receive_data/get_buffer call; copy it to keep it longer."""

    cmd: c.Cmd
    flags: int
    handle: int
    offset: int
    length: int
    payload: bytes | memoryview = b""

    @property
    def fua(self) -> bool:
        return bool(self.flags & c.CMD_FLAG_FUA)


@dataclass(frozen=True, slots=True)
class FileData:
    """In a read reply: `length` bytes of the export from `offset`, which the adapter
    sends itself (sendfile), so big reads never pass through Python."""

    offset: int
    length: int


Piece = bytes | memoryview | int | FileData  # a read reply piece; an int is a hole length
Outgoing = bytes | memoryview | FileData


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """A request answered with an error by the core itself (for logs and counters)."""

    handle: int
    error: int
    why: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    why: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """The ACK to NBD_OPT_STARTTLS is queued: send it in plaintext, then run the TLS server
    handshake and call tls_established(); from then on every byte goes through TLS."""


@dataclass(frozen=True, slots=True)
class TlsRequired:
    """An option answered NBD_REP_ERR_TLS_REQD: the client has not started TLS (for logs)."""

    option: int


class TlsMode(Enum):
    """How NBD_OPT_STARTTLS is answered (the spec's server modes)."""

    OFF = auto()  # NOTLS: STARTTLS is refused with NBD_REP_ERR_POLICY
    OPTIONAL = auto()  # SELECTIVETLS with no TLS-only export: the client chooses
    REQUIRE = auto()  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = ExportChosen | Request | RequestRefused | Disconnect | StartTls | TlsRequired


class Phase(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acknowledged, the adapter runs the handshake
    TRANSMISSION = auto()
    CLOSED = auto()


_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")

_KNOWN_FLAGS: dict[int, int] = {
    c.Cmd.READ: c.CMD_FLAG_FUA | c.CMD_FLAG_DF,
    c.Cmd.WRITE: c.CMD_FLAG_FUA,
    c.Cmd.DISC: 0,
    c.Cmd.FLUSH: c.CMD_FLAG_FUA,
    c.Cmd.TRIM: c.CMD_FLAG_FUA,
    c.Cmd.CACHE: c.CMD_FLAG_FUA,
    c.Cmd.WRITE_ZEROES: c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO,
    c.Cmd.BLOCK_STATUS: c.CMD_FLAG_FUA | c.CMD_FLAG_REQ_ONE,
}
_WRITES = frozenset((c.Cmd.WRITE, c.Cmd.TRIM, c.Cmd.WRITE_ZEROES))
_CMDS = {int(cmd): cmd for cmd in c.Cmd}  # a dict lookup is ~5x cheaper than Cmd(n)
_WRITE = int(c.Cmd.WRITE)
_READ = int(c.Cmd.READ)
_FUA = int(c.CMD_FLAG_FUA)
_DISC = int(c.Cmd.DISC)
_REQUEST_BYTES = _REQUEST.size
# The receive buffer: requests are parsed in place; it grows to hold one whole
# request (at most 32 MiB of WRITE payload) and shrinks back when that is done.
_RECV_BUFFER_BYTES = 256 << 10
RECEIVE_BUFFER_BYTES = _RECV_BUFFER_BYTES  # what a connection in transmission always holds
_PLAINTEXT_AFTER_STARTTLS = "plaintext bytes after NBD_OPT_STARTTLS, before the TLS handshake"
_RECV_MIN_FREE_BYTES = 64 << 10
# Until the handshake is done the buffer is small: a client that connects and never gets to
# transmission (a flood of them) costs this much, not _RECV_BUFFER_BYTES. An option of up to
# MAX_OPTION_BYTES still fits: the buffer grows to the size wanted.
_HANDSHAKE_BUFFER_BYTES = 4 << 10


class NbdServerConnection:
    """One client connection, from the greeting to the disconnect."""

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        max_payload: int = c.MAX_PAYLOAD_BYTES,
        tls: TlsMode = TlsMode.OFF,
    ) -> None:
        self._exports = exports
        self._max_payload = max_payload
        self._tls_mode = tls
        self.tls_active = False
        self._buf = bytearray(_HANDSHAKE_BUFFER_BYTES)
        self._start = 0  # unparsed bytes are self._buf[self._start:self._end]
        self._end = 0
        self._want = 4  # bytes from _start the parser needs to make progress
        self._out: list[Outgoing] = []
        self.phase = Phase.CLIENT_FLAGS
        self.export: ExportInfo | None = None
        self.structured = False
        self.no_zeroes = False
        self._meta_export: str | None = None
        self._meta_selected = False
        self._discard_bytes = 0
        self._out.append(
            struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)
        )

    # -- I/O boundary ------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the peer (the copying path; get_buffer avoids the copy)."""
        view = memoryview(data)
        while view:
            room = self.get_buffer(len(view))
            n = min(len(room), len(view))
            room[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space for the transport to receive into (asyncio.BufferedProtocol).

        Big enough for the whole request being parsed, so a large WRITE's payload
        lands in place and reaches the volume without a copy in Python.
        """
        avail, free_wanted = self._room_wanted()
        if len(self._buf) - self._end < free_wanted:
            self._make_room(avail, free_wanted)
        return memoryview(self._buf)[self._end :]

    def _room_wanted(self) -> tuple[int, int]:
        """(bytes buffered unparsed, free bytes the next get_buffer must offer)."""
        avail = self._end - self._start
        if self.phase is Phase.TRANSMISSION:
            return avail, max(self._want - avail, _RECV_MIN_FREE_BYTES)
        return avail, max(self._want - avail, 1)

    @property
    def buffer_bytes(self) -> int:
        """The receive buffer's size now."""
        return len(self._buf)

    @property
    def buffer_bytes_wanted(self) -> int:
        """The receive buffer's size after the next get_buffer(): more than buffer_bytes
        once the header of a big WRITE is parsed (its whole payload is received in place).
        An adapter that bounds memory checks this before it lets the transport read."""
        avail, free_wanted = self._room_wanted()
        size = len(self._buf)
        if size - self._end >= free_wanted:
            return size
        needed = avail + free_wanted
        floor = _RECV_BUFFER_BYTES if self.phase is Phase.TRANSMISSION else _HANDSHAKE_BUFFER_BYTES
        return size if needed <= size <= max(4 * needed, floor) else max(needed, floor)

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._discard_bytes:
            self._discard_buffered()

    @property
    def buffered_bytes(self) -> int:
        return self._end - self._start

    @property
    def mid_request(self) -> bool:
        """Part of a request has arrived and the rest has not (a header, a WRITE payload,
        or the payload of an oversized WRITE being skipped). False between requests."""
        return self.phase is Phase.TRANSMISSION and (
            self._end > self._start or self._discard_bytes > 0
        )

    def data_to_send(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | _NeedData:
        while True:
            if self._discard_bytes:
                self._discard_buffered()
                if self._discard_bytes:
                    return NEED_DATA
            if self.phase is Phase.TRANSMISSION:
                return self._next_request()
            if self.phase is Phase.CLOSED:
                return NEED_DATA
            if self.phase is Phase.TLS_HANDSHAKE:
                if self._end > self._start:
                    raise RemoteProtocolError(_PLAINTEXT_AFTER_STARTTLS)
                return NEED_DATA
            if self.phase is Phase.CLIENT_FLAGS:
                if self._end - self._start < 4:
                    self._want = 4
                    return NEED_DATA
                self._client_flags(struct.unpack_from(">I", self._buf, self._start)[0])
                self._start += 4
                continue
            event = self._next_option()
            if event is not None:
                return event

    def _make_room(self, avail: int, free_wanted: int) -> None:
        # Move the unparsed bytes to the front, into a new buffer when this one is too
        # small (or much too big for what is needed now). Payload views handed out
        # earlier are documented as invalid after this.
        buf = self._buf
        needed = avail + free_wanted
        floor = _RECV_BUFFER_BYTES if self.phase is Phase.TRANSMISSION else _HANDSHAKE_BUFFER_BYTES
        if needed <= len(buf) <= max(4 * needed, floor):
            buf[:avail] = buf[self._start : self._end]
        else:
            grown = bytearray(max(needed, floor))
            grown[:avail] = buf[self._start : self._end]
            self._buf = grown
        self._start, self._end = 0, avail

    def _discard_buffered(self) -> None:
        n = min(self._discard_bytes, self._end - self._start)
        self._start += n
        self._discard_bytes -= n

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[self._start : self._start + n])
        self._start += n
        return data

    # -- handshake -----------------------------------------------------------

    def _client_flags(self, flags: int) -> None:
        if flags & ~(c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES):
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS

    def _next_option(self) -> Event | _NeedData | None:
        avail = self._end - self._start
        if avail < _OPT_HEADER.size:
            self._want = _OPT_HEADER.size
            return NEED_DATA
        magic, opt, length = _OPT_HEADER.unpack_from(self._buf, self._start)
        if magic != c.IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        if length > c.MAX_OPTION_BYTES:
            raise RemoteProtocolError(f"option {opt} of {length} bytes is too large")
        if avail < _OPT_HEADER.size + length:
            self._want = _OPT_HEADER.size + length
            return NEED_DATA
        self._start += _OPT_HEADER.size
        return self._option(opt, self._take(length))

    def tls_established(self) -> None:
        """The adapter completed the TLS handshake that StartTls asked for."""
        if self.phase is not Phase.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_established() in phase {self.phase.name}")
        self.tls_active = True
        self.phase = Phase.OPTIONS

    def _option(self, opt: int, data: bytes) -> Event | None:
        if (
            self._tls_mode is TlsMode.REQUIRE
            and not self.tls_active
            and opt not in (c.Opt.STARTTLS, c.Opt.ABORT)
        ):
            return self._refuse_without_tls(opt)
        if opt == c.Opt.STARTTLS:
            return self._opt_starttls(opt, data)
        if opt == c.Opt.EXPORT_NAME:
            export = self._exports.get(data.decode("utf-8", "replace"))
            if export is None:
                raise RemoteProtocolError(f"unknown export {data[:64]!r} in EXPORT_NAME")
            self._out.append(struct.pack(">QH", export.size, self._transmission_flags(export)))
            if not self.no_zeroes:
                self._out.append(bytes(124))
            return self._enter_transmission(export)
        if opt == c.Opt.ABORT:
            self._opt_reply(opt, c.Rep.ACK)
            self.phase = Phase.CLOSED
            return Disconnect("client aborted the negotiation")
        if opt == c.Opt.LIST:
            self._opt_list(opt, data)
            return None
        if opt in (c.Opt.INFO, c.Opt.GO):
            return self._opt_info_go(opt, data)
        if opt == c.Opt.STRUCTURED_REPLY:
            if data:
                self._opt_error(opt, c.Rep.ERR_INVALID, "no data expected")
                return None
            self.structured = True
            self._opt_reply(opt, c.Rep.ACK)
            return None
        if opt in (c.Opt.LIST_META_CONTEXT, c.Opt.SET_META_CONTEXT):
            self._opt_meta_context(opt, data)
            return None
        self._opt_error(opt, c.Rep.ERR_UNSUP, f"option {opt} not supported")
        return None

    def _refuse_without_tls(self, opt: int) -> TlsRequired:
        if opt == c.Opt.EXPORT_NAME:  # it cannot be answered with an error: close
            raise RemoteProtocolError("NBD_OPT_EXPORT_NAME without TLS, and TLS is required")
        self._opt_error(opt, c.Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
        return TlsRequired(opt)

    def _opt_starttls(self, opt: int, data: bytes) -> StartTls | None:
        if self._tls_mode is TlsMode.OFF:
            self._opt_error(opt, c.Rep.ERR_POLICY, "TLS is not configured on this server")
            return None
        if data:
            self._opt_error(opt, c.Rep.ERR_INVALID, "STARTTLS takes no data")
            return None
        if self.tls_active:
            self._opt_error(opt, c.Rep.ERR_INVALID, "TLS is already running")
            return None
        if self._end > self._start:  # sent before our ACK: they would be read as plaintext
            raise RemoteProtocolError(_PLAINTEXT_AFTER_STARTTLS)
        self._opt_reply(opt, c.Rep.ACK)
        # What was negotiated in plaintext may have been injected by a man in the middle
        # (nbdkit's CVE-2021-3716): the client negotiates it again under TLS.
        self.structured = False
        self._meta_export, self._meta_selected = None, False
        self.phase = Phase.TLS_HANDSHAKE
        return StartTls()

    def _opt_reply(self, opt: int, rep: int, payload: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(c.OPTION_REPLY_MAGIC, opt, rep, len(payload)) + payload)

    def _opt_error(self, opt: int, rep: int, message: str) -> None:
        self._opt_reply(opt, rep, message.encode())

    def _opt_list(self, opt: int, data: bytes) -> None:
        if data:
            self._opt_error(opt, c.Rep.ERR_INVALID, "LIST takes no data")
            return None
        for name in self._exports:
            raw = name.encode()
            self._opt_reply(opt, c.Rep.SERVER, struct.pack(">I", len(raw)) + raw)
        self._opt_reply(opt, c.Rep.ACK)
        return None

    def _opt_info_go(self, opt: int, data: bytes) -> Event | None:
        if len(data) < 6:
            self._opt_error(opt, c.Rep.ERR_INVALID, "INFO/GO too short")
            return None
        (name_len,) = struct.unpack_from(">I", data)
        if 4 + name_len + 2 > len(data):
            self._opt_error(opt, c.Rep.ERR_INVALID, "INFO/GO name length")
            return None
        name = data[4 : 4 + name_len].decode("utf-8", "replace")
        (n_req,) = struct.unpack_from(">H", data, 4 + name_len)
        if 6 + name_len + 2 * n_req != len(data):
            self._opt_error(opt, c.Rep.ERR_INVALID, "INFO/GO request count")
            return None
        export = self._exports.get(name)
        if export is None:
            self._opt_error(opt, c.Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        requested = struct.unpack_from(f">{n_req}H", data, 6 + name_len)
        info = struct.pack(">HQH", c.Info.EXPORT, export.size, self._transmission_flags(export))
        self._opt_reply(opt, c.Rep.INFO, info)
        if c.Info.NAME in requested:
            self._opt_reply(opt, c.Rep.INFO, struct.pack(">H", c.Info.NAME) + name.encode())
        if c.Info.DESCRIPTION in requested and export.description:
            raw = export.description.encode()
            self._opt_reply(opt, c.Rep.INFO, struct.pack(">H", c.Info.DESCRIPTION) + raw)
        block = struct.pack(
            ">HIII", c.Info.BLOCK_SIZE, 1, c.PREFERRED_BLOCK_BYTES, self._max_payload
        )
        self._opt_reply(opt, c.Rep.INFO, block)
        self._opt_reply(opt, c.Rep.ACK)
        if opt == c.Opt.GO:
            return self._enter_transmission(export)
        return None

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._opt_error(opt, c.Rep.ERR_INVALID, "negotiate structured replies first")
            return None
        try:
            name, queries = _parse_meta_request(data)
        except ValueError as exc:
            self._opt_error(opt, c.Rep.ERR_INVALID, str(exc))
            return None
        if name not in self._exports:
            self._opt_error(opt, c.Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        match = (not queries and opt == c.Opt.LIST_META_CONTEXT) or any(
            q in (c.BASE_ALLOCATION, "base:") for q in queries
        )
        if opt == c.Opt.SET_META_CONTEXT:
            self._meta_export, self._meta_selected = name, match
        if match:
            raw = c.BASE_ALLOCATION.encode()
            ctx_id = c.BASE_ALLOCATION_ID if opt == c.Opt.SET_META_CONTEXT else 0
            self._opt_reply(opt, c.Rep.META_CONTEXT, struct.pack(">I", ctx_id) + raw)
        self._opt_reply(opt, c.Rep.ACK)
        return None

    def _transmission_flags(self, export: ExportInfo) -> int:
        flags = c.FLAG_HAS_FLAGS | c.FLAG_SEND_FLUSH | c.FLAG_SEND_FUA | c.FLAG_SEND_CACHE
        flags |= c.FLAG_CAN_MULTI_CONN
        if self.structured:
            flags |= c.FLAG_SEND_DF
        if export.read_only:
            return flags | c.FLAG_READ_ONLY
        flags |= c.FLAG_SEND_TRIM | c.FLAG_SEND_WRITE_ZEROES
        if export.fast_zero:
            flags |= c.FLAG_SEND_FAST_ZERO
        return flags

    def _enter_transmission(self, export: ExportInfo) -> ExportChosen:
        self.export = export
        if self._meta_export != export.name:
            self._meta_selected = False
        self.phase = Phase.TRANSMISSION
        return ExportChosen(export)

    # -- transmission ----------------------------------------------------------

    def _next_request(self) -> Event | _NeedData:
        start = self._start
        avail = self._end - start
        if avail < _REQUEST_BYTES:
            self._want = _REQUEST_BYTES
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._buf, start)
        if magic != c.REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        payload: bytes | memoryview = b""
        if cmd == _WRITE:
            if length > self._max_payload:
                self._start = start + _REQUEST_BYTES
                return self._discard_and_refuse(
                    handle, length, c.EOVERFLOW, f"write of {length} bytes over the maximum"
                )
            total = _REQUEST_BYTES + length
            if avail < total:
                self._want = total
                return NEED_DATA
            payload = memoryview(self._buf)[start + _REQUEST_BYTES : start + total]
            self._start = start + total
        else:
            self._start = start + _REQUEST_BYTES
        if self._start == self._end:
            self._start = self._end = 0  # empty: next receive starts at the front, no move
            if len(self._buf) > _RECV_BUFFER_BYTES:  # a big WRITE's: not kept while idle
                self._buf = bytearray(_RECV_BUFFER_BYTES)  # (its payload view keeps the old)
        self._want = _REQUEST_BYTES
        if cmd == _DISC:
            self.phase = Phase.CLOSED
            return Disconnect("client sent DISC")
        why = self._invalid(cmd, flags, offset, length)
        if why is not None:
            error, message = why
            request = Request(_CMDS.get(cmd, c.Cmd.READ), flags, handle, offset, length)
            self.reply_error(request, error, message)
            return RequestRefused(handle, error, message)
        return Request(_CMDS[cmd], flags, handle, offset, length, payload)

    def _discard_and_refuse(self, handle: int, length: int, error: int, why: str) -> Event:
        self._discard_bytes = length
        self._discard_buffered()
        self.reply_error(Request(c.Cmd.WRITE, 0, handle, 0, length), error, why)
        return RequestRefused(handle, error, why)

    def _invalid(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        export = self.export
        assert export is not None
        if (
            (cmd == _WRITE and not flags & ~_FUA and not export.read_only)
            or (cmd == _READ and not flags & ~_FUA and length <= self._max_payload)
        ) and 0 < length <= export.size - offset:
            return None  # the common case, checked first and cheaply
        known = _KNOWN_FLAGS.get(cmd)
        if known is None:
            return c.EINVAL, f"unknown command {cmd}"
        if flags & ~known:
            return c.EINVAL, f"flags {flags:#x} not valid for {_CMDS[cmd].name}"
        if cmd == c.Cmd.FLUSH:
            return None
        if cmd in _WRITES and export.read_only:
            return c.EPERM, "export is read-only"
        if flags & c.CMD_FLAG_DF and not self.structured:
            return c.EINVAL, "DF without structured replies"
        if cmd == c.Cmd.BLOCK_STATUS and not self._meta_selected:
            return c.EINVAL, "no metadata context selected"
        if cmd == c.Cmd.READ and length > self._max_payload:
            return c.EOVERFLOW, f"read of {length} bytes over the maximum"
        if length == 0:
            return c.EINVAL, "zero length"
        if offset + length > export.size:
            if cmd in (c.Cmd.WRITE, c.Cmd.WRITE_ZEROES):
                return c.ENOSPC, "past the end of the export"
            return c.EINVAL, "past the end of the export"
        return None

    # -- replies ---------------------------------------------------------------

    def reply_ok(self, request: Request) -> None:
        self._out.append(_SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, request.handle))

    def reply_error(self, request: Request, error: int, message: str = "") -> None:
        if self.structured:
            raw = message.encode()[:4096]
            payload = struct.pack(">IH", error, len(raw)) + raw
            self._out.append(
                _CHUNK.pack(
                    c.STRUCTURED_REPLY_MAGIC,
                    c.REPLY_FLAG_DONE,
                    c.REPLY_TYPE_ERROR,
                    request.handle,
                    len(payload),
                )
            )
            self._out.append(payload)
        else:
            self._out.append(_SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, request.handle))

    def reply_read(self, request: Request, pieces: Sequence[tuple[int, Piece]]) -> None:
        """Answer a READ: each piece is (offset, data), (offset, hole length) or
        (offset, FileData) for bytes the adapter sends from the volume itself."""
        out = self._out
        if not self.structured:
            out.append(_SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, request.handle))
            for _, piece in pieces:
                out.append(bytes(piece) if isinstance(piece, int) else piece)
            return
        last = len(pieces) - 1
        for i, (offset, piece) in enumerate(pieces):
            done = c.REPLY_FLAG_DONE if i == last else 0
            if isinstance(piece, int):
                out.append(
                    _CHUNK.pack(
                        c.STRUCTURED_REPLY_MAGIC, done, c.REPLY_TYPE_OFFSET_HOLE, request.handle, 12
                    )
                    + struct.pack(">QI", offset, piece)
                )
                continue
            length = piece.length if isinstance(piece, FileData) else len(piece)
            out.append(
                _CHUNK.pack(
                    c.STRUCTURED_REPLY_MAGIC,
                    done,
                    c.REPLY_TYPE_OFFSET_DATA,
                    request.handle,
                    8 + length,
                )
                + struct.pack(">Q", offset)
            )
            out.append(piece)

    def reply_block_status(self, request: Request, extents: Sequence[tuple[int, int]]) -> None:
        """Answer BLOCK_STATUS with (length, flags) descriptors of base:allocation."""
        if request.flags & c.CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        body = struct.pack(">I", c.BASE_ALLOCATION_ID) + b"".join(
            struct.pack(">II", length, flags) for length, flags in extents
        )
        self._out.append(
            _CHUNK.pack(
                c.STRUCTURED_REPLY_MAGIC,
                c.REPLY_FLAG_DONE,
                c.REPLY_TYPE_BLOCK_STATUS,
                request.handle,
                len(body),
            )
        )
        self._out.append(body)


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    if len(data) < 8:
        raise ValueError("meta context request too short")
    (name_len,) = struct.unpack_from(">I", data)
    pos = 4 + name_len
    if pos + 4 > len(data):
        raise ValueError("meta context export name length")
    name = data[4:pos].decode("utf-8", "replace")
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("meta context query truncated")
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + qlen > len(data):
            raise ValueError("meta context query truncated")
        queries.append(data[pos : pos + qlen].decode("utf-8", "replace"))
        pos += qlen
    if pos != len(data):
        raise ValueError("meta context request has trailing bytes")
    return name, queries
