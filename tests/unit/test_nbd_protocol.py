"""The sans-I/O NBD core, fed one byte at a time, with no sockets."""

import struct

import pytest

from common.nbd import constants as c
from common.nbd.protocol import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    FileData,
    NbdServerConnection,
    RemoteProtocolError,
    Request,
    RequestRefused,
)

EXPORTS = {"vol0": ExportInfo("vol0", 1 << 20, False), "ro": ExportInfo("ro", 1 << 20, True)}


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def request(cmd: int, offset: int, length: int, flags: int = 0, handle: int = 7) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def feed_bytewise(conn: NbdServerConnection, data: bytes) -> list[object]:
    events: list[object] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        while (ev := conn.next_event()) is not NEED_DATA:
            # A WRITE payload is a view into the receive buffer, valid until the next feed.
            events.append(ev._replace(payload=bytes(ev.payload)) if isinstance(ev, Request) else ev)
    return events


def go(name: str) -> bytes:
    raw = name.encode()
    return option(c.Opt.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))


def out(conn: NbdServerConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def test_greeting_then_go_then_write_read_one_byte_at_a_time() -> None:
    conn = NbdServerConnection(EXPORTS)
    assert out(conn)[:16] == b"NBDMAGICIHAVEOPT"
    stream = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE) + option(c.Opt.STRUCTURED_REPLY)
    stream += go("vol0") + request(c.Cmd.WRITE, 4096, 4, c.CMD_FLAG_FUA) + b"abcd"
    stream += request(c.Cmd.READ, 0, 512, handle=8) + request(c.Cmd.DISC, 0, 0)
    events = feed_bytewise(conn, stream)
    assert isinstance(events[0], ExportChosen) and events[0].export.name == "vol0"
    assert events[1] == Request(c.Cmd.WRITE, c.CMD_FLAG_FUA, 7, 4096, 4, b"abcd")
    assert events[2] == Request(c.Cmd.READ, 0, 8, 0, 512)
    assert isinstance(events[3], Disconnect)
    replies = out(conn)
    assert replies.count(struct.pack(">QI", c.OPTION_REPLY_MAGIC, c.Opt.GO)) >= 2


def test_unknown_client_flags_drop_the_connection() -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 0x80))
    with pytest.raises(RemoteProtocolError, match="unknown client flags"):
        conn.next_event()


def test_unknown_option_is_unsupported_and_negotiation_goes_on() -> None:
    conn = NbdServerConnection(EXPORTS)
    out(conn)
    events = feed_bytewise(conn, struct.pack(">I", 1) + option(99) + go("vol0"))
    assert isinstance(events[0], ExportChosen)
    assert struct.pack(">QII", c.OPTION_REPLY_MAGIC, 99, c.Rep.ERR_UNSUP) in out(conn)


def test_unknown_export_in_go_is_an_error_reply() -> None:
    conn = NbdServerConnection(EXPORTS)
    out(conn)
    assert feed_bytewise(conn, struct.pack(">I", 1) + go("nope")) == []
    assert struct.pack(">QII", c.OPTION_REPLY_MAGIC, c.Opt.GO, c.Rep.ERR_UNKNOWN) in out(conn)


def transmitting(name: str = "vol0") -> NbdServerConnection:
    conn = NbdServerConnection(EXPORTS)
    feed_bytewise(conn, struct.pack(">I", 1) + go(name))
    out(conn)
    return conn


@pytest.mark.parametrize(
    ("name", "cmd", "offset", "length", "error"),
    [
        ("vol0", c.Cmd.READ, (1 << 20) - 1, 2, c.EINVAL),
        ("vol0", c.Cmd.TRIM, 1 << 20, 1, c.EINVAL),
        ("vol0", c.Cmd.WRITE_ZEROES, (1 << 20) - 1, 2, c.ENOSPC),
        ("ro", c.Cmd.TRIM, 0, 512, c.EPERM),
        ("vol0", c.Cmd.READ, 0, (32 << 20) + 1, c.EOVERFLOW),
        ("vol0", 42, 0, 1, c.EINVAL),
    ],
)
def test_invalid_requests_are_refused_with_the_spec_error(
    name: str, cmd: int, offset: int, length: int, error: int
) -> None:
    conn = transmitting(name)
    events = feed_bytewise(conn, request(cmd, offset, length))
    assert len(events) == 1 and isinstance(events[0], RequestRefused)
    assert out(conn) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, error, 7)


def test_write_past_end_consumes_its_payload_and_the_stream_goes_on() -> None:
    conn = transmitting()
    events = feed_bytewise(
        conn, request(c.Cmd.WRITE, 1 << 20, 3) + b"xyz" + request(c.Cmd.FLUSH, 0, 0, handle=9)
    )
    assert isinstance(events[0], RequestRefused) and events[0].error == c.ENOSPC
    assert events[1] == Request(c.Cmd.FLUSH, 0, 9, 0, 0)


def test_oversized_write_is_discarded_without_buffering_it() -> None:
    conn = transmitting()
    length = 64 << 20
    conn.receive_data(request(c.Cmd.WRITE, 0, length))
    events = []
    chunk = bytes(1 << 20)
    for _ in range(64):
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
        assert conn.buffered_bytes < (2 << 20)
    conn.receive_data(request(c.Cmd.FLUSH, 0, 0, handle=9))
    events.append(conn.next_event())
    assert isinstance(events[0], RequestRefused) and events[0].error == c.EOVERFLOW
    assert events[-1] == Request(c.Cmd.FLUSH, 0, 9, 0, 0)


def test_bad_request_magic_is_a_protocol_error() -> None:
    conn = transmitting()
    conn.receive_data(b"\0" * 28)
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()


def test_read_reply_with_file_data_leaves_the_bytes_to_the_adapter() -> None:
    conn = transmitting()
    conn.receive_data(request(c.Cmd.READ, 0, 1 << 20, handle=5))
    req = conn.next_event()
    assert isinstance(req, Request)
    conn.reply_read(req, [(0, FileData(0, 1 << 20))])
    header, item = conn.data_to_send()
    assert item == FileData(0, 1 << 20)
    assert bytes(header) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 5)
