"""The NBD adapter under a client that asks for far more reads than it reads back.

The real NbdConnection, ReplySender and a real volume file; only the socket is fake: a
transport that keeps what is written to it until the test "reads" it, as a client that does
not read leaves it in the server. One receive of thousands of 127 KiB READ headers must stop
at the reply backlog limit, leave the rest of the requests buffered, and serve them, in order,
once the client reads again. A held client is busy for the stall timeout.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable
from pathlib import Path

import pytest

from common.nbd import constants as c
from common.nbd.sender import QUEUE_HIGH_BYTES
from common.nbd.server import REPLY_CHUNK_BYTES, NbdConnection, NbdServer
from common.volume import Volume
from tests.unit.test_nbd_protocol import go, request

pytestmark = pytest.mark.timeout(60)

KiB, MiB = 1 << 10, 1 << 20
READ_BYTES = 127 * KiB  # just under the size sent from the file: replies are in memory
READS = 2 * QUEUE_HIGH_BYTES // READ_BYTES  # replies worth twice the backlog limit
# What the server may hold for one connection (see BURST_RSS_GROWTH_MAX_BYTES in
# tests/e2e/test_nbd_hostile.py): the queue to its high mark, one chunk past it, and the
# chunk the transport took before it was busy.
HELD_MAX_BYTES = QUEUE_HIGH_BYTES + 2 * REPLY_CHUNK_BYTES
SIMPLE_REPLY = struct.Struct(">IIQ")


class UnreadSocket:
    """A transport whose peer reads only when the test says so (drain)."""

    def __init__(self, protocol: NbdConnection) -> None:
        self.protocol = protocol
        self.unread: list[bytes] = []
        self.unread_bytes = 0
        self.delivered = bytearray()
        self.reading = True
        self.busy = False

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 10809) if name == "peername" else None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        assert (high, low) == (1, 0)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.unread_bytes

    def writelines(self, items: Iterable[bytes | memoryview]) -> None:
        for item in items:
            self.write(item)

    def write(self, data: bytes | memoryview) -> None:
        self.unread.append(bytes(data))
        self.unread_bytes += len(data)
        if not self.busy:
            self.busy = True
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def receive(self, data: bytes) -> bytes:
        """What the kernel hands the protocol while it reads; returns what it keeps."""
        while data and self.reading:
            room = self.protocol.get_buffer(len(data))
            n = min(len(room), len(data))
            room[:n] = data[:n]
            self.protocol.buffer_updated(n)
            data = data[n:]
        return data

    def drain(self) -> None:
        """The client reads everything written so far."""
        self.delivered += b"".join(self.unread)
        self.unread, self.unread_bytes = [], 0
        if self.busy:
            self.busy = False
            self.protocol.resume_writing()

    def held_bytes(self) -> int:
        sender = self.protocol._sender
        assert sender is not None
        return self.unread_bytes + sender._queued_bytes


def connect(tmp_path: Path) -> tuple[NbdConnection, UnreadSocket]:
    volume = Volume.open_or_create("vol0", tmp_path / "vol0.img", 64 * MiB)
    volume.write(0, b"\x5a" * MiB)
    conn = NbdConnection(NbdServer({"vol0": volume}))
    sock = UnreadSocket(conn)
    conn.connection_made(sock)  # type: ignore[arg-type]
    flags = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES)
    assert sock.receive(flags + go("vol0")) == b""
    while sock.unread:  # each drain lets the sender hand over what it queued meanwhile
        sock.drain()
    sock.delivered.clear()
    return conn, sock


def read_burst() -> bytes:
    return b"".join(
        request(c.Cmd.READ, (i % 8) * 128 * KiB, READ_BYTES, handle=i) for i in range(READS)
    )


def replies(stream: bytes) -> list[int]:
    """The cookies of the simple READ replies in `stream`, each checked for success and data."""
    cookies, pos = [], 0
    while pos < len(stream):
        magic, error, cookie = SIMPLE_REPLY.unpack_from(stream, pos)
        assert (magic, error) == (c.SIMPLE_REPLY_MAGIC, 0), (magic, error, cookie)
        pos += SIMPLE_REPLY.size
        assert stream[pos : pos + READ_BYTES] == b"\x5a" * READ_BYTES, cookie
        pos += READ_BYTES
        cookies.append(cookie)
    return cookies


async def turn_the_loop() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_one_receive_of_reads_stops_at_the_backlog_limit_and_the_rest_waits(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        conn, sock = connect(tmp_path)
        kept = sock.receive(read_burst())
        assert not sock.reading, "a full backlog must pause reading"
        assert sock.held_bytes() <= HELD_MAX_BYTES, sock.held_bytes() / MiB
        assert sock.held_bytes() >= QUEUE_HIGH_BYTES, "stopped before the limit"
        assert kept == b"" and conn._core.buffered_bytes > 0, "the rest waits in the buffer"
        await turn_the_loop()
        assert not sock.reading and sock.held_bytes() <= HELD_MAX_BYTES, "nothing drained"

    asyncio.run(scenario())


def test_requests_held_back_are_answered_in_order_as_the_client_reads(tmp_path: Path) -> None:
    async def scenario() -> None:
        _conn, sock = connect(tmp_path)
        kept = sock.receive(read_burst())
        peak = sock.held_bytes()
        for _ in range(100):
            if len(sock.delivered) == READS * (SIMPLE_REPLY.size + READ_BYTES):
                break
            sock.drain()
            await turn_the_loop()
            kept = sock.receive(kept)
            peak = max(peak, sock.held_bytes())
        assert replies(bytes(sock.delivered)) == list(range(READS))
        assert sock.reading, "reading resumes once every request is served"
        assert peak <= HELD_MAX_BYTES, peak / MiB

    asyncio.run(scenario())


def test_a_held_client_that_never_reads_is_busy_and_stalls_out(tmp_path: Path) -> None:
    async def scenario() -> None:
        conn, sock = connect(tmp_path)
        sock.receive(read_burst())
        now = asyncio.get_running_loop().time()
        stall_s = conn._server.limits.stall_timeout_s
        assert conn.overdue(now) is None  # the stall clock starts
        assert conn.overdue(now + stall_s / 2) is None
        why = conn.overdue(now + stall_s)
        assert why is not None and "stalled" in why, why

    asyncio.run(scenario())
