"""A TCP proxy that puts link faults between two processes (end-to-end tests of replication).

    secondaryd ──► 127.0.0.1:proxy.port ──► FaultProxy ──► primary's replication port
                   (its own asyncio loop in a daemon thread; start() / close() / with)

    each accepted connection: "client" connected to us, "target" is where we connected to
        client ─► read ─► queue (≤ buffer_bytes, chunks with their read time) ─► write ─► target
        target ─► read ─► queue (the same, the other way) ──────────────────────► write ─► client
        a chunk is written once due: read time + delay, later if the throttle's pacing says
        so, never while blackholed; a full queue stops the reading (backpressure, no growth)
        EOF and a reset from a peer travel as queued chunks, so they are delayed and held too

    faults, from the test thread at any time; each call returns once the loop applied it,
    to existing and new connections alike (a new delay applies to chunks already queued)
        set_delay(s), set_throttle(bytes_per_s)
        cut()        ─► reset (RST) every connection; new ones: accepted, then reset at once
        blackhole()  ─► forward nothing, send no FIN, no RST; new ones: accepted, never connected
        restore()    ─► no faults; connections a blackhole held are reset now (as a TCP
                        retransmission timeout would after a partition), new ones go through

Faults change only on the loop thread (the calls hand them over), so no lock is needed; the
counters only grow, are written on the loop thread and may be read from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"
# per direction of each connection, read and not yet written; asyncio's streams hold at most
# 128 KiB more read ahead and 64 KiB unsent (their default limits)
BUFFER_BYTES = 1 << 20
CHUNK_BYTES = 64 << 10  # one read
PACE_S = 0.02  # throttled writes go out in pieces of this many seconds' worth of bytes
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
TO_TARGET = "to_target"
TO_CLIENT = "to_client"


class _Mode(enum.Enum):
    OPEN = "open"
    CUT = "cut"
    BLACKHOLE = "blackhole"


@dataclasses.dataclass(frozen=True)
class _Faults:
    delay_s: float = 0.0
    rate_bytes_per_s: float | None = None
    mode: _Mode = _Mode.OPEN

    def hold_s(self, read_at: float, next_write_at: float, now: float) -> float | None:
        """How long a chunk read at ``read_at`` must still wait (None: until faults change)."""
        if self.mode is not _Mode.OPEN:
            return None
        due = read_at + self.delay_s
        if self.rate_bytes_per_s is not None:
            due = max(due, next_write_at)  # the throttle's pacing
        return max(0.0, due - now)


class _Wakeup:
    """A pulse: wait() returns at the next fire(), or after ``timeout_s`` (None: no limit)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()  # wakes everyone waiting now; later waiters get a fresh event
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float | None = None) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that comes
        # as the event fires, and a pipe cancelled by cut() then runs on: cut() hangs.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._event.wait()


def _linger_zero(sock: Any) -> None:
    """Make the next close() send RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Pipe:
    """One direction of one connection: src ─► bounded queue ─► dst, each chunk when due."""

    def __init__(
        self,
        proxy: FaultProxy,
        direction: str,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        self.proxy, self.direction, self.src, self.dst = proxy, direction, src, dst
        # (read at, data): b"" is the source's EOF, None its reset
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued_bytes = 0
        self.wakeup = _Wakeup()  # queue changed or faults changed
        self.next_write_at = 0.0  # the throttle's pacing

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            room = self.proxy.buffer_bytes - self.queued_bytes
            if room <= 0:
                await self.wakeup.wait()
                continue
            data: bytes | None
            try:
                data = await self.src.read(min(CHUNK_BYTES, room))
            except OSError:
                data = None
            self.queue.append((loop.time(), data))
            self.queued_bytes += len(data or b"")
            self.wakeup.fire()
            if not data:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                await self.wakeup.wait()
                continue
            read_at, data = self.queue[0]
            hold_s = self.proxy._faults.hold_s(read_at, self.next_write_at, loop.time())
            if hold_s is None or hold_s > 0:
                await self.wakeup.wait(hold_s)
                continue
            if data is None:
                raise ConnectionResetError(f"{self.direction}: the source was reset")
            if not data:
                self.dst.write_eof()
                return
            await self._write_piece(read_at, data, loop.time())

    async def _write_piece(self, read_at: float, data: bytes, now: float) -> None:
        rate = self.proxy._faults.rate_bytes_per_s
        piece = data if rate is None else data[: max(1, int(rate * PACE_S))]
        if rate is not None:
            self.next_write_at = max(now, self.next_write_at) + len(piece) / rate
        self.dst.write(piece)
        await self.dst.drain()
        if len(piece) < len(data):
            self.queue[0] = (read_at, data[len(piece) :])
        else:
            self.queue.popleft()
        self.queued_bytes -= len(piece)
        self.proxy.bytes_forwarded[self.direction] += len(piece)
        self.wakeup.fire()


class _Conn:
    """One accepted connection: the raw client socket until asyncio owns it, then streams."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.writers: list[asyncio.StreamWriter] = []  # client's, then target's
        self.pipes: list[_Pipe] = []
        self.closed = False

    def wake(self) -> None:
        for pipe in self.pipes:
            pipe.wakeup.fire()

    def close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.writers:
            _linger_zero(self.client)
            self.client.close()
        for writer in self.writers:
            if reset:
                _linger_zero(writer.get_extra_info("socket"))
                writer.transport.abort()
            else:
                writer.close()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``, with faults on demand."""

    def __init__(
        self, target_host: str, target_port: int, *, buffer_bytes: int = BUFFER_BYTES
    ) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.buffer_bytes = buffer_bytes
        self.port = 0  # known once started
        self.connections_accepted = 0
        self.bytes_forwarded = {TO_TARGET: 0, TO_CLIENT: 0}
        self._faults = _Faults()
        self._conns: dict[_Conn, asyncio.Task[None]] = {}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # --- the test thread -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._listener is not None:
            raise RuntimeError("a FaultProxy starts once")
        self._listener = socket.create_server((HOST, 0), backlog=socket.SOMAXCONN)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.port}")
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(COMMAND_TIMEOUT_S):
            raise RuntimeError(f"FaultProxy loop did not start in {COMMAND_TIMEOUT_S} s")
        return self

    def close(self) -> None:
        """Reset every connection, stop listening, end the thread; re-raise what broke it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended (it failed)
                self._loop.call_soon_threadsafe(self._stopping.set)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"FaultProxy thread still running {STOP_TIMEOUT_S} s after close")
        if self._error is not None:
            raise RuntimeError("FaultProxy loop failed") from self._error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def set_delay(self, seconds: float) -> None:
        """One-way latency, both directions: each chunk leaves ``seconds`` after it came."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, not {seconds}")
        self._update(lambda faults: dataclasses.replace(faults, delay_s=seconds))

    def set_throttle(self, bytes_per_s: float | None) -> None:
        """At most ``bytes_per_s`` per direction of each connection (None: no limit)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"throttle must be > 0 bytes/s or None, not {bytes_per_s}")
        self._update(lambda faults: dataclasses.replace(faults, rate_bytes_per_s=bytes_per_s))

    def cut(self) -> None:
        self._update(lambda faults: dataclasses.replace(faults, mode=_Mode.CUT))

    def blackhole(self) -> None:
        self._update(lambda faults: dataclasses.replace(faults, mode=_Mode.BLACKHOLE))

    def restore(self) -> None:
        self._update(lambda faults: _Faults())

    def _update(self, change: Callable[[_Faults], _Faults]) -> None:
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("FaultProxy is not running") from self._error
        future = asyncio.run_coroutine_threadsafe(self._apply(change), loop)
        future.result(COMMAND_TIMEOUT_S)

    # --- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # handed to close()
            self._error = exc
        finally:
            assert self._listener is not None
            self._listener.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._ready.set()
        try:
            async with asyncio.TaskGroup() as group:
                accepting = group.create_task(self._accept(group))
                await self._stopping.wait()
                accepting.cancel()
                for task in self._conns.values():
                    task.cancel()
        finally:
            for conn in list(self._conns):
                self._drop(conn)

    async def _accept(self, group: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            client, _ = await loop.sock_accept(self._listener)
            self.connections_accepted += 1
            conn = _Conn(client)
            self._conns[conn] = group.create_task(self._serve(conn))

    async def _serve(self, conn: _Conn) -> None:
        clean = False
        try:
            clean = await self._forward(conn)
        except* OSError:
            pass  # a peer's reset, the target refusing: the connection ends, reset both ways
        finally:
            self._conns.pop(conn, None)
            conn.close(reset=not clean)

    async def _forward(self, conn: _Conn) -> bool:
        """Forward until both directions saw EOF (True); raise OSError on a reset."""
        client_reader, client_writer = await asyncio.open_connection(sock=conn.client)
        conn.writers.append(client_writer)
        if self._faults.mode is _Mode.CUT:
            return False
        if self._faults.mode is _Mode.BLACKHOLE:
            await asyncio.get_running_loop().create_future()  # until restore() cancels us
        target_reader, target_writer = await asyncio.wait_for(
            asyncio.open_connection(self.target_host, self.target_port), CONNECT_TIMEOUT_S
        )
        conn.writers.append(target_writer)
        conn.pipes = [
            _Pipe(self, TO_TARGET, client_reader, target_writer),
            _Pipe(self, TO_CLIENT, target_reader, client_writer),
        ]
        async with asyncio.TaskGroup() as group:
            for pipe in conn.pipes:
                group.create_task(pipe.read())
                group.create_task(pipe.write())
        return True

    async def _apply(self, change: Callable[[_Faults], _Faults]) -> None:
        old = self._faults
        self._faults = new = change(old)
        leaving_blackhole = old.mode is _Mode.BLACKHOLE and new.mode is not _Mode.BLACKHOLE
        if new.mode is _Mode.CUT or leaving_blackhole:
            await self._reset_all()
        for conn in self._conns:
            conn.wake()

    async def _reset_all(self) -> None:
        """Reset every open connection; return once their sockets are closed."""
        conns = list(self._conns.items())
        for _, task in conns:
            task.cancel()
        if conns:
            await asyncio.wait([task for _, task in conns])
        for conn, _ in conns:  # also those whose task was cancelled before it ran
            self._drop(conn)
        await asyncio.sleep(0)  # transport.abort() closes its socket in the next iteration

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn, None)
        conn.close(reset=True)
