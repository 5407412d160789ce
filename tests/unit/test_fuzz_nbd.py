"""Hostile bytes into the sans-I/O NBD core: random, generated and mutated client streams.

Whatever a client sends, the core raises nothing but RemoteProtocolError, never holds more
than one request (or option) plus its receive slack, and emits only requests that are safe to
run: inside the export, a WRITE's payload exactly its length, no write to a read-only export.
A stream gives the same events and replies however the transport splits it.

The fake adapter below drives the core as common.nbd.server does (get_buffer, buffer_updated,
next_event until NEED_DATA, reply_*) and runs each request against a fake volume that checks
every access.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.nbd import constants as c
from common.nbd.protocol import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    FileData,
    NbdServerConnection,
    Phase,
    RemoteProtocolError,
    Request,
    RequestRefused,
)
from tests.unit.fuzzing import mutate, peak_traced

MAX_PAYLOAD = 4096  # small, so that short streams cross the payload limit both ways
EXPORTS = {
    "vol0": ExportInfo("vol0", 48 << 10, read_only=False),
    "ro": ExportInfo("ro", (20 << 10) + 17, read_only=True),  # odd size: ends mid-sector
    "slow": ExportInfo("slow", 12 << 10, read_only=False, fast_zero=False),
}
# What the NBD spec allows per command (proto.md); the core must never let more through.
SPEC_FLAGS: dict[c.Cmd, int] = {
    c.Cmd.READ: c.CMD_FLAG_FUA | c.CMD_FLAG_DF,
    c.Cmd.WRITE: c.CMD_FLAG_FUA,
    c.Cmd.FLUSH: c.CMD_FLAG_FUA,
    c.Cmd.TRIM: c.CMD_FLAG_FUA,
    c.Cmd.CACHE: c.CMD_FLAG_FUA,
    c.Cmd.WRITE_ZEROES: c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO,
    c.Cmd.BLOCK_STATUS: c.CMD_FLAG_FUA | c.CMD_FLAG_REQ_ONE,
}
WRITES = (c.Cmd.WRITE, c.Cmd.TRIM, c.Cmd.WRITE_ZEROES)
_REQUEST = struct.Struct(">IHHQQI")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def buffer_bound(max_payload: int) -> int:
    """The most the core may ever hold: its 256 KiB resting buffer, or one whole request
    (header + largest payload) or option (header + largest option) plus the 64 KiB of free
    room get_buffer always offers."""
    largest = max(_REQUEST.size + max_payload, 16 + c.MAX_OPTION_BYTES)
    return max(256 << 10, largest + (64 << 10))


# -- a fake volume and a fake adapter ----------------------------------------------------------


class FakeVolume:
    """Stands in for common.volume.Volume; fails the test on any access a real disk would
    have let through (past the end, zero length, a write to a read-only export)."""

    def __init__(self, info: ExportInfo) -> None:
        self.info = info
        self.data = bytearray(info.size)

    def _check(self, offset: int, length: int, *, writing: bool) -> None:
        assert offset >= 0 and length > 0 and offset + length <= self.info.size, (offset, length)
        assert not (writing and self.info.read_only), "write to a read-only export"

    def write(self, offset: int, payload: bytes) -> None:
        self._check(offset, len(payload), writing=True)
        self.data[offset : offset + len(payload)] = payload

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length, writing=True)
        self.data[offset : offset + length] = bytes(length)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, writing=False)
        return bytes(self.data[offset : offset + length])


def check_request(conn: NbdServerConnection, req: Request, max_payload: int) -> None:
    """What the core promises of every Request it emits (see _invalid)."""
    export = conn.export
    assert conn.phase is Phase.TRANSMISSION and export is not None
    assert req.cmd in SPEC_FLAGS, req
    assert not req.flags & ~SPEC_FLAGS[req.cmd], req
    assert 0 <= req.handle < 1 << 64
    if req.cmd is c.Cmd.WRITE:
        assert len(req.payload) == req.length <= max_payload, req
    else:
        assert len(req.payload) == 0, req
    if req.cmd is c.Cmd.READ:
        assert req.length <= max_payload, req
    if req.cmd in WRITES:
        assert not export.read_only, req
    if req.flags & c.CMD_FLAG_DF or req.cmd is c.Cmd.BLOCK_STATUS:
        assert conn.structured, req
    if req.cmd is not c.Cmd.FLUSH:  # FLUSH's range is ignored: nothing reads it
        assert req.length > 0 and req.offset + req.length <= export.size, req


@dataclass
class Run:
    """What one client stream did to the core."""

    events: list[object] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    error: str | None = None
    peak_bytes: int = 0  # the largest receive buffer the core ever asked the transport to fill


class FakeAdapter:
    """common.nbd.server.NbdConnection without the socket, the volume and the journal."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.conn = NbdServerConnection(EXPORTS, max_payload=max_payload)
        self.max_payload = max_payload
        self.volumes = {name: FakeVolume(info) for name, info in EXPORTS.items()}
        self.volume: FakeVolume | None = None
        self.run = Run()
        self.flush_out()

    @property
    def done(self) -> bool:
        return self.run.error is not None or self.conn.phase is Phase.CLOSED

    def receive(self, data: bytes, *, copying: bool = False) -> None:
        """Hand `data` over the way the transport does, then run what it completed."""
        if copying:
            self.conn.receive_data(data)
            self.drain()
            return
        view = memoryview(data)
        while view and not self.done:
            room = self.get_buffer()
            n = min(len(room), len(view))
            room[:n] = view[:n]
            self.conn.buffer_updated(n)
            view = view[n:]
            self.drain()
        if not self.done:
            self.get_buffer()  # the transport's next read: where a buffer for a big WRITE grows

    def get_buffer(self) -> memoryview:
        room = self.conn.get_buffer(-1)
        # Every buffer the core allocates is seen here in full: it only grows in get_buffer,
        # and then holds exactly the unparsed bytes and this free room.
        self.run.peak_bytes = max(self.run.peak_bytes, self.conn.buffered_bytes + len(room))
        return room

    def drain(self) -> None:
        try:
            while (event := self.conn.next_event()) is not NEED_DATA:
                self.handle(event)
        except RemoteProtocolError as exc:
            self.run.error = str(exc)
        self.flush_out()

    def handle(self, event: object) -> None:
        if isinstance(event, Request):
            check_request(self.conn, event, self.max_payload)
            # A WRITE's payload is a view into the receive buffer: copied before the next feed.
            self.run.events.append(event._replace(payload=bytes(event.payload)))
            self.execute(event)
            self.flush_out()  # now: a FileData piece is the volume as of this request
            return
        self.run.events.append(event)
        if isinstance(event, ExportChosen):
            assert self.volume is None, "a second export chosen"
            assert EXPORTS[event.export.name] is event.export is self.conn.export
            self.volume = self.volumes[event.export.name]
        else:
            assert isinstance(event, RequestRefused | Disconnect), event

    def execute(self, req: Request) -> None:
        volume = self.volume
        assert volume is not None
        if req.cmd is c.Cmd.WRITE:
            volume.write(req.offset, bytes(req.payload))
        elif req.cmd in (c.Cmd.TRIM, c.Cmd.WRITE_ZEROES):
            volume.zero(req.offset, req.length)
        elif req.cmd is c.Cmd.READ:
            data = volume.read(req.offset, req.length)
            if req.length > 1024 and self.conn.structured:
                half = req.length // 2  # a data piece, a hole and one left to the adapter
                quarter = half // 2
                self.conn.reply_read(
                    req,
                    [
                        (req.offset, data[:quarter]),
                        (req.offset + quarter, half - quarter),
                        (req.offset + half, FileData(req.offset + half, req.length - half)),
                    ],
                )
            else:
                self.conn.reply_read(req, [(req.offset, data)])
            return
        elif req.cmd is c.Cmd.BLOCK_STATUS:
            volume.read(req.offset, req.length)  # the range check extents() would do
            self.conn.reply_block_status(req, [(req.length, 0), (1, c.STATE_HOLE)])
            return
        self.conn.reply_ok(req)

    def flush_out(self) -> None:
        for item in self.conn.data_to_send():
            if isinstance(item, FileData):
                assert self.volume is not None
                self.run.replies.append(self.volume.read(item.offset, item.length))
            else:
                self.run.replies.append(bytes(item))


def serve(stream: bytes, chunks: list[int], *, copying: bool = False) -> Run:
    """Feed `stream` in pieces of the given sizes (cycled); the test fails on any exception
    but RemoteProtocolError, which ends the run like the adapter's close."""
    adapter = FakeAdapter()
    fed = 0
    for piece in split(stream, chunks):
        adapter.receive(piece, copying=copying)
        fed += len(piece)
        if adapter.done:
            break
    if adapter.conn.phase is Phase.CLOSED:
        # The adapter stops reading here; bytes that still arrive must never become requests.
        adapter.conn.receive_data(stream[fed:] + request(c.Cmd.WRITE, 0, 1, 0, 1) + b"x")
        assert adapter.conn.next_event() is NEED_DATA
    return adapter.run


def split(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        yield data[pos : pos + size]
        pos, i = pos + size, i + 1


# -- client streams, built from the spec -------------------------------------------------------


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def name_data(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def info_go(opt: int, name: str, infos: tuple[int, ...] = ()) -> bytes:
    return option(opt, name_data(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos))


def meta(opt: int, name: str, queries: tuple[str, ...]) -> bytes:
    data = name_data(name) + struct.pack(">I", len(queries))
    return option(opt, data + b"".join(name_data(q) for q in queries))


def request(cmd: int, flags: int, handle: int, offset: int, length: int) -> bytes:
    return _REQUEST.pack(c.REQUEST_MAGIC, flags, cmd, handle, offset, length)


OPTIONS: dict[str, Callable[[str], bytes]] = {
    "structured": lambda _: option(c.Opt.STRUCTURED_REPLY),
    "structured with data": lambda _: option(c.Opt.STRUCTURED_REPLY, b"x"),
    "list": lambda _: option(c.Opt.LIST),
    "info": lambda name: info_go(c.Opt.INFO, name, (c.Info.NAME, c.Info.DESCRIPTION)),
    "info of another": lambda _: info_go(c.Opt.INFO, "nope"),
    "info cut short": lambda name: option(c.Opt.INFO, name_data(name)),
    "set meta": lambda name: meta(c.Opt.SET_META_CONTEXT, name, (c.BASE_ALLOCATION,)),
    "set other meta": lambda name: meta(c.Opt.SET_META_CONTEXT, name, ("qemu:dirty",)),
    "list meta": lambda name: meta(c.Opt.LIST_META_CONTEXT, name, ()),
    "meta cut short": lambda name: option(c.Opt.SET_META_CONTEXT, name_data(name)),
    "starttls": lambda _: option(c.Opt.STARTTLS),
    "unknown": lambda _: option(0x7FFF, b"junk"),
}
ENDINGS: dict[str, Callable[[str], bytes]] = {
    "go": lambda name: info_go(c.Opt.GO, name, (c.Info.BLOCK_SIZE,)),
    "export name": lambda name: option(c.Opt.EXPORT_NAME, name.encode()),
}


@st.composite
def handshakes(draw: st.DrawFn, name: str) -> bytes:
    flags = c.FLAG_C_FIXED_NEWSTYLE | draw(st.sampled_from([0, c.FLAG_C_NO_ZEROES]))
    parts = [struct.pack(">I", flags)]
    if draw(st.booleans()):  # what qemu does, so that BLOCK_STATUS is allowed
        parts += [OPTIONS["structured"](name), OPTIONS["set meta"](name)]
    parts += [OPTIONS[kind](name) for kind in draw(st.lists(st.sampled_from(sorted(OPTIONS))))]
    return b"".join([*parts, ENDINGS[draw(st.sampled_from(sorted(ENDINGS)))](name)])


def _near(limit: int) -> st.SearchStrategy[int]:
    return st.sampled_from([limit - 1, limit, limit + 1])


commands = st.one_of(st.sampled_from([*SPEC_FLAGS]), st.integers(0, 0xFFFF))
command_flags = st.one_of(
    st.sampled_from([0, *sorted(set(SPEC_FLAGS.values())), c.CMD_FLAG_DF]),
    st.integers(0, 0xFFFF),
)
offsets = st.one_of(
    st.integers(0, 64 << 10), st.sampled_from([2**63 - 1, 2**63, 2**64 - 4096, 2**64 - 1])
)
lengths = st.one_of(
    st.integers(0, 2 * MAX_PAYLOAD), _near(MAX_PAYLOAD), st.sampled_from([2**31, 2**32 - 1])
)


@st.composite
def requests(draw: st.DrawFn, size: int) -> bytes:
    kind = draw(st.sampled_from(["correct", "at the end", "wild"]))
    if kind == "wild":
        cmd, flags = draw(commands), draw(command_flags)
        offset, length = draw(offsets), draw(lengths)
    else:  # what a correct client sends, or that moved across the end of the export
        cmd = draw(st.sampled_from([*SPEC_FLAGS]))
        flags = draw(st.integers(0, SPEC_FLAGS[cmd])) & SPEC_FLAGS[cmd]
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(MAX_PAYLOAD, size - offset)))
        if kind == "at the end":
            length = draw(st.sampled_from([0, length, length + 1, size + 1 - offset]))
            offset = max(0, size - length + draw(st.integers(-1, 1)))
    header = request(cmd, flags, draw(st.integers(0, 2**64 - 1)), offset, length)
    if cmd != c.Cmd.WRITE:
        return header
    # The whole payload follows, but a huge one is cut short (the rest of the stream then
    # goes to the discarded payload).
    return header + bytes([draw(st.integers(0, 255))]) * min(length, 2 * MAX_PAYLOAD)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(EXPORTS)))
    size = EXPORTS[name].size
    asked = draw(st.lists(requests(size), max_size=8))
    # Bytes after a WRITE whose payload was cut short are that payload's rest, not requests:
    # a valid session ends there (the core discards them, then reads whatever follows).
    whole = [i for i, req in enumerate(asked) if _cut_short(req)]
    parts = [draw(handshakes(name)), *(asked[: whole[0] + 1] if whole else asked)]
    if not whole and draw(st.booleans()):
        parts.append(request(c.Cmd.DISC, 0, 1, 0, 0))
    return b"".join(parts)


def _cut_short(req: bytes) -> bool:
    _, _, cmd, _, _, length = _REQUEST.unpack_from(req)
    return cmd == c.Cmd.WRITE and length > len(req) - _REQUEST.size


@st.composite
def mutated(draw: st.DrawFn, streams: st.SearchStrategy[bytes]) -> bytes:
    return mutate(draw, draw(streams), max_run=12)


chunkings = st.lists(st.integers(1, 700), min_size=1, max_size=6)


# -- the properties ----------------------------------------------------------------------------


def assert_sane(run: Run) -> None:
    assert run.peak_bytes <= buffer_bound(MAX_PAYLOAD)
    chosen = [e for e in run.events if isinstance(e, ExportChosen)]
    assert len(chosen) <= 1
    if run.events and not chosen:
        assert all(isinstance(e, Disconnect) for e in run.events), run.events


@FUZZ
@given(stream=st.binary(max_size=3000), chunks=chunkings)
def test_random_bytes_only_ever_raise_remote_protocol_error(
    stream: bytes, chunks: list[int]
) -> None:
    assert_sane(serve(stream, chunks))


@FUZZ
@given(
    stream=st.builds(bytes.__add__, handshakes("vol0"), st.binary(max_size=2000)), chunks=chunkings
)
def test_random_bytes_after_a_handshake_only_raise_remote_protocol_error(
    stream: bytes, chunks: list[int]
) -> None:
    assert_sane(serve(stream, chunks))


@settings(FUZZ, max_examples=300)
@given(stream=mutated(sessions()), chunks=chunkings)
def test_mutated_sessions_only_raise_remote_protocol_error_and_run_only_valid_requests(
    stream: bytes, chunks: list[int]
) -> None:
    assert_sane(serve(stream, chunks))


@FUZZ
@given(stream=sessions(), chunks=chunkings)
def test_generated_sessions_run_only_valid_requests(stream: bytes, chunks: list[int]) -> None:
    run = serve(stream, chunks)
    assert_sane(run)
    # Built from the spec, the stream breaks no framing: every request is answered or run.
    assert run.error is None, run.error
    assert isinstance(run.events[0], ExportChosen)


@FUZZ
@given(stream=st.one_of(sessions(), mutated(sessions())), chunks=chunkings, copying=st.booleans())
def test_any_split_of_a_stream_gives_the_same_events_and_replies(
    stream: bytes, chunks: list[int], copying: bool
) -> None:
    whole = serve(stream, [len(stream) or 1], copying=copying)
    pieces = serve(stream, chunks, copying=not copying)
    assert pieces.events == whole.events
    assert pieces.error == whole.error
    assert b"".join(pieces.replies) == b"".join(whole.replies)


def test_the_generated_sessions_reach_every_command() -> None:
    # Guards the properties above: the streams do get requests of every kind past the core.
    seen: set[c.Cmd] = set()
    errors: set[int] = set()

    @settings(FUZZ, max_examples=200)
    @given(stream=sessions())
    def collect(stream: bytes) -> None:
        events = serve(stream, [97]).events
        seen.update(e.cmd for e in events if isinstance(e, Request))
        errors.update(e.error for e in events if isinstance(e, RequestRefused))

    collect()
    assert seen == set(SPEC_FLAGS)
    assert errors == {c.EINVAL, c.EPERM, c.ENOSPC, c.EOVERFLOW}


# -- lengths that would be allocated if the core believed them ----------------------------------


def _transmitting(max_payload: int) -> FakeAdapter:
    adapter = FakeAdapter(max_payload)
    adapter.receive(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE) + ENDINGS["go"]("vol0"))
    assert isinstance(adapter.run.events[0], ExportChosen)
    return adapter


@pytest.mark.parametrize("cmd", [c.Cmd.WRITE, c.Cmd.READ, c.Cmd.WRITE_ZEROES, 0xBEEF])
def test_a_4_gib_request_is_refused_without_allocating_it(cmd: int) -> None:
    adapter = _transmitting(c.MAX_PAYLOAD_BYTES)
    # The peer sends the header and 1 MiB of its claimed payload.
    stream = request(cmd, 0, 9, 0, 2**32 - 1) + bytes(1 << 20)
    peak = peak_traced(lambda: adapter.receive(stream))
    assert peak < 256 << 10
    refused = adapter.run.events[1]
    assert isinstance(refused, RequestRefused) and refused.handle == 9
    assert adapter.run.peak_bytes <= buffer_bound(c.MAX_PAYLOAD_BYTES)


def test_a_4_gib_option_is_refused_on_sight() -> None:
    adapter = FakeAdapter()
    stream = struct.pack(">I", 1) + struct.pack(">QII", c.IHAVEOPT, c.Opt.GO, 2**32 - 1)
    peak = peak_traced(lambda: adapter.receive(stream))
    assert peak < 64 << 10
    assert adapter.run.error is not None and "too large" in adapter.run.error


@pytest.mark.parametrize("max_payload", [MAX_PAYLOAD, 512 << 10])
@settings(FUZZ, max_examples=100)
@given(
    cmd=st.sampled_from([c.Cmd.WRITE, c.Cmd.WRITE, c.Cmd.READ, c.Cmd.TRIM, 0xBEEF]),
    data=st.data(),
    sent=st.integers(0, 70_000),
)
def test_a_request_header_of_any_length_stays_within_the_buffer_bound(
    max_payload: int, cmd: int, data: st.DataObject, sent: int
) -> None:
    big = st.integers(max_payload // 2, max_payload + 1)  # where the buffer has to grow
    length = data.draw(st.one_of(st.integers(0, 2**32 - 1), big, _near(max_payload)))
    adapter = _transmitting(max_payload)
    adapter.receive(request(cmd, 0, 3, 0, length) + bytes(sent))
    assert adapter.run.peak_bytes <= buffer_bound(max_payload)
