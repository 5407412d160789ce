"""Clients that break the NBD protocol, on a plain socket: each is dropped and logged, and a
well-behaved libnbd client on another connection keeps working (invariant 7).

The few protocol pieces needed are spelled out here from NetworkBlockDevice/nbd doc/proto.md.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time
from collections.abc import Iterator

import nbd
import pytest

from tests.e2e.helpers import HOST, Daemon, KiB, MiB, close_handle, read_at
from tests.e2e.nbdsetup import recv_exact

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_EXPORT_NAME = 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
INFO_EXPORT = 0
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
EINVAL = 22
DROP_TIMEOUT_S = 10.0


class RawClient:
    """Just enough of an NBD client to misbehave on purpose."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=DROP_TIMEOUT_S)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, length: int) -> bytes:
        return recv_exact(self.sock, length)

    def greeting(self) -> int:
        magic, option_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, option_magic) == (NBDMAGIC, IHAVEOPT), "not a fixed-newstyle server"
        assert flags & FLAG_FIXED_NEWSTYLE, flags
        return int(flags)

    def send_client_flags(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.sock.sendall(struct.pack(">I", flags))

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return option, reply, self.recv_exact(length)

    def go(self, name: str) -> tuple[int, int]:
        """NBD_OPT_GO; returns (size, transmission flags) from NBD_INFO_EXPORT."""
        encoded = name.encode()
        self.send_option(OPT_GO, struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0))
        export = None
        while True:
            option, reply, data = self.option_reply()
            assert option == OPT_GO, option
            if reply == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                export = struct.unpack(">QH", data[2:12])
            elif reply == REP_ACK:
                assert export is not None, "GO acknowledged without NBD_INFO_EXPORT"
                return export
            else:
                assert reply == REP_INFO, f"GO refused: reply type {reply:#x} {data!r}"

    def handshake(self, name: str = "vol0") -> tuple[int, int]:
        self.greeting()
        self.send_client_flags()
        return self.go(name)

    def request_header(self, command: int, offset: int, length: int, cookie: int = 1) -> bytes:
        return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return int(error), int(cookie)

    def wait_dropped(self) -> bytes:
        """Read until the server closes; fail if it does not within DROP_TIMEOUT_S."""
        received = b""
        deadline = time.monotonic() + DROP_TIMEOUT_S
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return received
            except TimeoutError:
                raise AssertionError(
                    f"server kept the connection open {DROP_TIMEOUT_S} s (got {received!r})"
                ) from None
            if not chunk:
                return received
            received += chunk


@pytest.fixture
def bystander(primary: Daemon) -> Iterator[nbd.NBD]:
    """A well-behaved client, connected before the misbehaving one and checked after it."""
    handle = nbd.NBD()
    handle.connect_uri(primary.uri())
    handle.pwrite(b"\x5a" * MiB, 0)
    handle.flush()
    yield handle
    close_handle(handle)


def assert_bystander_works(handle: nbd.NBD) -> None:
    handle.pwrite(b"\xc3" * 4096, 8 * MiB)
    assert handle.pread(4096, 8 * MiB) == b"\xc3" * 4096
    assert handle.pread(MiB, 0) == b"\x5a" * MiB


def assert_logged(daemon: Daemon, log_offset: int, client: RawClient) -> None:
    """The daemon logged something naming this client (its source port) after log_offset."""
    pattern = re.compile(rf"(?<!\d){client.port}(?!\d)")
    deadline = time.monotonic() + DROP_TIMEOUT_S
    while not pattern.search(daemon.log_text()[log_offset:]):
        if time.monotonic() > deadline:
            new = daemon.log_text()[log_offset:]
            raise AssertionError(
                f"no log line names the dropped client 127.0.0.1:{client.port}; new log:\n{new}"
            )
        time.sleep(0.05)


def test_garbage_instead_of_an_option_is_dropped_and_logged(
    primary: Daemon, bystander: nbd.NBD
) -> None:
    offset = len(primary.log_text())
    client = RawClient(primary.nbd_port)
    client.greeting()
    client.send_client_flags()
    client.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))

    client.wait_dropped()
    client.close()
    assert_logged(primary, offset, client)
    assert_bystander_works(bystander)


def test_unknown_client_flags_drop_the_connection(primary: Daemon, bystander: nbd.NBD) -> None:
    client = RawClient(primary.nbd_port)
    client.greeting()
    client.send_client_flags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | 0x100)
    client.send_option(OPT_GO, struct.pack(">I", 4) + b"vol0" + struct.pack(">H", 0))

    received = client.wait_dropped()
    client.close()
    assert received == b"", f"server answered an option after unknown client flags: {received!r}"
    assert_bystander_works(bystander)


def test_unknown_option_gets_err_unsup_and_negotiation_goes_on(primary: Daemon) -> None:
    client = RawClient(primary.nbd_port)
    try:
        client.greeting()
        client.send_client_flags()
        client.send_option(0x7FFF, b"whatever")

        option, reply, _ = client.option_reply()
        assert (option, reply) == (0x7FFF, REP_ERR_UNSUP), f"reply type {reply:#x}"
        size, _flags = client.go("vol0")
        assert size == 64 * MiB
    finally:
        client.close()


def test_export_name_option_then_read_with_simple_reply(primary: Daemon) -> None:
    client = RawClient(primary.nbd_port)
    try:
        flags = client.greeting()
        assert flags & FLAG_NO_ZEROES, "server does not offer NBD_FLAG_NO_ZEROES"
        client.send_client_flags()
        client.send_option(OPT_EXPORT_NAME, b"vol0")
        size, _transmission = struct.unpack(">QH", client.recv_exact(10))  # no 124 zeroes
        assert size == 64 * MiB

        client.sock.sendall(client.request_header(CMD_READ, 4096, 512, cookie=0xABCDEF))
        assert client.simple_reply() == (0, 0xABCDEF)
        assert client.recv_exact(512) == bytes(512)
        client.sock.sendall(client.request_header(CMD_DISC, 0, 0, cookie=2))
        assert client.wait_dropped() == b"", "server replied to NBD_CMD_DISC"
    finally:
        client.close()


def test_unknown_command_gets_einval_and_connection_goes_on(primary: Daemon) -> None:
    client = RawClient(primary.nbd_port)
    try:
        client.handshake()
        client.sock.sendall(client.request_header(0x4242, 0, 0, cookie=7))
        assert client.simple_reply() == (EINVAL, 7)
        client.sock.sendall(client.request_header(CMD_READ, 0, 512, cookie=8))
        assert client.simple_reply() == (0, 8)
        assert client.recv_exact(512) == bytes(512)
    finally:
        client.close()


def test_bad_request_magic_is_dropped_and_logged(primary: Daemon, bystander: nbd.NBD) -> None:
    offset = len(primary.log_text())
    client = RawClient(primary.nbd_port)
    client.handshake()
    client.sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))

    client.wait_dropped()
    client.close()
    assert_logged(primary, offset, client)
    assert_bystander_works(bystander)


def test_half_a_request_header_then_vanishing_is_dropped_and_logged(
    primary: Daemon, bystander: nbd.NBD
) -> None:
    offset = len(primary.log_text())
    client = RawClient(primary.nbd_port)
    client.handshake()
    client.sock.sendall(client.request_header(CMD_READ, 0, 4096)[:13])
    client.close()

    assert_logged(primary, offset, client)
    assert_bystander_works(bystander)


def test_disconnect_mid_write_payload_is_dropped_and_not_applied(
    primary: Daemon, bystander: nbd.NBD
) -> None:
    offset = len(primary.log_text())
    client = RawClient(primary.nbd_port)
    client.handshake()
    client.sock.sendall(client.request_header(CMD_WRITE, 0, MiB) + b"\xee" * (256 * KiB))
    client.close()

    assert_logged(primary, offset, client)
    assert_bystander_works(bystander)  # includes: the first MiB still reads 0x5a
    assert read_at(primary.volume().path, 0, MiB) == b"\x5a" * MiB, "half a write was applied"


def test_pipelined_big_reads_to_a_slow_reader_arrive_whole_and_in_order(primary: Daemon) -> None:
    """Big reads leave by sendfile while the socket takes them, by pread + write when it
    is full; a client that stops reading for a while must still get every byte, in order."""
    client = RawClient(primary.nbd_port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)  # force partials
    try:
        client.handshake()
        content = random.Random(7).randbytes(8 * MiB)
        client.sock.sendall(client.request_header(CMD_WRITE, 0, len(content), cookie=1) + content)
        assert client.simple_reply() == (0, 1)
        reads = [(cookie, (cookie * 3 % 8) * MiB, MiB) for cookie in range(2, 66)]
        client.sock.sendall(b"".join(client.request_header(CMD_READ, o, n, c) for c, o, n in reads))
        time.sleep(0.5)  # the client stalls on purpose: the server's socket fills up
        for cookie, offset, length in reads:
            assert client.simple_reply() == (0, cookie)
            assert client.recv_exact(length) == content[offset : offset + length], cookie
    finally:
        client.close()
