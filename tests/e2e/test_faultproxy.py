"""FaultProxy between a test's socket and a real echo server: what each fault does to the link.

    test socket ──► FaultProxy (127.0.0.1:proxy.port) ──► EchoServer (thread per connection)
                ◄──          delay, throttle, cut,     ◄── sends back every byte it reads
                             blackhole, restore

Waiting for a state polls (wait_until); the only timed waits are a read that must time out
(the blackhole) and the elapsed times the delay and the throttle must add.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.faultproxy import TO_CLIENT, TO_TARGET, FaultProxy
from tests.e2e.helpers import HOST, KiB, MiB, tcp_accepts, wait_until

pytestmark = [pytest.mark.timeout(60)]

SOCKET_TIMEOUT_S = 10.0
STALL_S = 0.5  # a read through a blackhole must still be waiting after this long


class _EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        with self.server.counted(), contextlib.suppress(OSError):
            while data := self.request.recv(64 * KiB):
                self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes each connection's bytes back; counts connections accepted and still open."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen() backlog; 5 by default

    def __init__(self) -> None:
        super().__init__((HOST, 0), _EchoHandler)
        self.port = int(self.server_address[1])
        self.accepted = 0
        self.open = 0
        self.handler_threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        with self._lock:
            self.accepted += 1
            self.open += 1
            self.handler_threads.add(threading.current_thread())
        try:
            yield
        finally:
            with self._lock:
                self.open -= 1


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(SOCKET_TIMEOUT_S)


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(HOST, echo.port) as started:
        yield started


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection((HOST, proxy.port), timeout=SOCKET_TIMEOUT_S)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 * MiB))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def echo_back(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` from a thread while reading its echo here (neither side can block)."""
    errors: list[OSError] = []

    def send() -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = recv_exactly(sock, len(data))
    sender.join(SOCKET_TIMEOUT_S)
    assert not errors, f"sending through the proxy failed: {errors}"
    return received


def test_data_passes_unchanged_both_ways(proxy: FaultProxy, echo: EchoServer) -> None:
    data = random.Random(1).randbytes(8 * MiB)
    with connect(proxy) as sock:
        received = echo_back(sock, data)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()
    assert proxy.connections_accepted == 1 and echo.accepted == 1
    wait_until(
        lambda: proxy.bytes_forwarded == {TO_TARGET: len(data), TO_CLIENT: len(data)},
        timeout_s=5,
        what=f"{len(data)} bytes counted each way (have {proxy.bytes_forwarded})",
    )


def test_delay_adds_it_each_way_and_applies_to_an_open_connection(proxy: FaultProxy) -> None:
    delay_s = 0.3
    with connect(proxy) as sock:
        assert round_trip(sock) == b"ping"
        proxy.set_delay(delay_s)
        started = time.monotonic()
        assert round_trip(sock, b"slow") == b"slow"
        elapsed_s = time.monotonic() - started
        assert 2 * delay_s <= elapsed_s < 2 * delay_s + 1.0, f"round trip took {elapsed_s:.3f} s"
        proxy.set_delay(0)
        started = time.monotonic()
        assert round_trip(sock, b"fast") == b"fast"
        assert time.monotonic() - started < delay_s


def test_throttle_bounds_throughput_per_direction(proxy: FaultProxy) -> None:
    rate = 256 * KiB
    data = random.Random(2).randbytes(512 * KiB)
    expected_s = len(data) / rate  # both directions at `rate`, pipelined through the echo
    with connect(proxy) as sock:
        proxy.set_throttle(rate)
        started = time.monotonic()
        assert echo_back(sock, data) == data
        elapsed_s = time.monotonic() - started
        assert 0.9 * expected_s <= elapsed_s < 1.5 * expected_s + 1.0, f"took {elapsed_s:.2f} s"
        proxy.set_throttle(None)
        started = time.monotonic()
        assert echo_back(sock, data) == data
        assert time.monotonic() - started < expected_s / 2


def test_cut_resets_connections_and_refuses_new_ones_until_restore(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    with contextlib.ExitStack() as stack:
        old = stack.enter_context(connect(proxy))
        assert round_trip(old) == b"ping"
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            old.recv(1)
        wait_until(lambda: echo.open == 0, timeout_s=5, what="the echo side of the link reset")

        # the kernel completes the handshake; the RST comes as the connect returns, or after
        with pytest.raises(ConnectionResetError), connect(proxy) as refused:
            refused.recv(1)
        assert proxy.connections_accepted == 2
        assert echo.accepted == 1, "a connection during the cut reached the target"

        proxy.restore()
        fresh = stack.enter_context(connect(proxy))
        assert round_trip(fresh) == b"ping"
        assert echo.accepted == 2


def test_blackhole_stalls_silently_and_restore_resets_the_stalled_connections(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    with contextlib.ExitStack() as stack:
        old = stack.enter_context(connect(proxy))
        assert round_trip(old) == b"ping"
        proxy.blackhole()
        old.sendall(b"lost")
        old.settimeout(STALL_S)
        with pytest.raises(TimeoutError):
            old.recv(1)

        held = stack.enter_context(connect(proxy))
        held.sendall(b"lost too")
        held.settimeout(STALL_S)
        with pytest.raises(TimeoutError):
            held.recv(1)
        assert echo.accepted == 1, "a connection during the blackhole reached the target"
        assert echo.open == 1, "the blackhole closed the target's side (FIN or RST)"

        proxy.restore()
        for stalled in (old, held):
            stalled.settimeout(SOCKET_TIMEOUT_S)
            with pytest.raises(ConnectionResetError):
                stalled.recv(1)
        wait_until(lambda: echo.open == 0, timeout_s=5, what="the echo side of the link reset")
        fresh = stack.enter_context(connect(proxy))
        assert round_trip(fresh) == b"ping"


def test_a_hundred_connections_at_once(proxy: FaultProxy, echo: EchoServer) -> None:
    count = 100
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(proxy)) for _ in range(count)]
        wait_until(lambda: echo.open == count, timeout_s=10, what=f"{count} open at the target")
        payloads = [f"connection {i} ".encode() * 100 for i in range(count)]
        for sock, payload in zip(socks, payloads, strict=True):
            sock.sendall(payload)
        for sock, payload in zip(socks, payloads, strict=True):
            assert recv_exactly(sock, len(payload)) == payload
    assert proxy.connections_accepted == count


def test_a_target_that_does_not_read_stalls_the_sender() -> None:
    """Backpressure: the proxy stops reading rather than buffering what the target won't take."""
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(socket.create_server((HOST, 0)))
        sink.settimeout(SOCKET_TIMEOUT_S)
        proxy = stack.enter_context(FaultProxy(HOST, int(sink.getsockname()[1])))
        sender = stack.enter_context(connect(proxy))
        target, _ = sink.accept()
        stack.enter_context(target)
        target.settimeout(SOCKET_TIMEOUT_S)
        data = bytes(64 * MiB)
        sent = 0
        sender.settimeout(STALL_S)
        with pytest.raises(TimeoutError):
            while sent < len(data):
                sent += sender.send(data[sent : sent + MiB])
        # kernel buffers on three sockets hold a few MiB; the proxy at most its buffer more
        assert sent < 48 * MiB, f"the proxy took {sent} bytes nobody read"
        assert recv_exactly(target, sent) == data[:sent]


def test_close_resets_connections_and_leaves_no_thread(echo: EchoServer) -> None:
    threads_before = set(threading.enumerate())
    with FaultProxy(HOST, echo.port) as proxy, connect(proxy) as sock:
        assert round_trip(sock) == b"ping"
        proxy.close()
        leftover = set(threading.enumerate()) - threads_before - echo.handler_threads
        assert not leftover, f"threads still running after close(): {leftover}"
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        assert not tcp_accepts(proxy.port)
