"""The reply stream of one NBD connection: bytes through the transport, big reads by sendfile.

    core.data_to_send() ─► send() ─► queue (bounded by the reader pausing) ─► _pump()
                                                                        │
        bytes ──────────────────────────────────────────────► transport.writelines
        FileData, transport idle ──► os.sendfile(socket, volume) (no copy through Python)
        FileData, transport busy ──► wait for resume_writing (order on the wire holds)
        FileData, socket full mid-way ──► pread at most SPILL_BYTES ──► transport.write,
            the rest back at the head of the queue (sendfile again once that has drained)

The transport's write buffer limits are set to (1, 0), so pause_writing means "has
bytes queued" and resume_writing "fully drained": the moment sendfile is safe again. The
spill is what makes the transport report that moment; it is small, so a client that stops
reading mid-way holds SPILL_BYTES of its big read in memory, not all of it.

memory_bytes is what the connection holds in memory for its replies (bytes queued here and in
the transport; a FileData costs nothing until its turn): what nbd.memory_limit counts.

After NBD_OPT_STARTTLS (start_tls) the queue holds plaintext items as before, and the pump
encrypts them when the transport is idle, at most TLS_CHUNK_BYTES at a time:

    queue ─► _pump_tls() ─► FileData read from the volume (sendfile cannot encrypt), in slices
                            bytes as they are ─► TlsPipe.write ─► records ─► transport.write

so a connection holds one chunk of plaintext and its records however much it has queued
(a FileData costs nothing until its turn), and the same backlog bound applies. The pipe's
own output (handshake, alerts) is written first, in the order the pipe made it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable

from common.nbd.protocol import FileData, Outgoing
from common.tlspipe import TlsPipe
from common.volume import Volume

log = logging.getLogger("journalpair.nbd")

# Stop reading requests while this much reply data waits (queued here or in the transport).
QUEUE_HIGH_BYTES = 64 << 20
QUEUE_LOW_BYTES = 16 << 20
TLS_CHUNK_BYTES = 4 << 20  # plaintext encrypted per turn of the pump (a bound on memory)
SPILL_BYTES = 256 << 10  # of a FileData sendfile left unsent, read and written per turn


class ReplySender:
    def __init__(self, transport: asyncio.Transport, on_backlog: Callable[[bool], None]) -> None:
        self._transport = transport
        self._on_backlog = on_backlog  # True: stop reading requests; False: go on
        self._queue: deque[Outgoing] = deque()
        self._queued_bytes = 0
        self._queued_file_bytes = 0  # of _queued_bytes: FileData, not in memory
        self._transport_busy = False
        self._backlogged = False
        self.drained_count = 0  # times the client took every byte queued: progress
        self.volume: Volume | None = None  # set once the client has chosen an export
        self._tls: TlsPipe | None = None
        sock = transport.get_extra_info("socket")
        self._socket_fd = sock.fileno() if sock is not None else -1
        transport.set_write_buffer_limits(high=1, low=0)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._transport_busy

    @property
    def memory_bytes(self) -> int:
        """Reply bytes held in memory: queued here, or in the transport's buffer."""
        queued = self._queued_bytes - self._queued_file_bytes
        return queued + self._transport.get_write_buffer_size()

    @property
    def backlogged(self) -> bool:
        """Over QUEUE_HIGH_BYTES and not yet back to QUEUE_LOW_BYTES: take no more requests."""
        return self._backlogged

    def start_tls(self, tls: TlsPipe) -> None:
        """From now on everything sent goes through `tls`; send([]) writes what the pipe
        itself has to send (its handshake, an alert)."""
        self._tls = tls

    def send(self, items: list[Outgoing]) -> None:
        if self._tls is not None:
            self._enqueue(items)
            self._pump_tls(self._tls)
            return
        if not self._queue and not self._transport_busy and not self._transport.is_closing():
            for item in items:
                if isinstance(item, FileData):
                    break
            else:  # only bytes, nothing waiting: straight to the transport
                self._transport.writelines(items)  # type: ignore[arg-type]
                return
        self._enqueue(items)
        self._pump()

    def _enqueue(self, items: list[Outgoing]) -> None:
        for item in items:
            self._queue.append(item)
            self._queued_bytes += _size(item)
            if isinstance(item, FileData):
                self._queued_file_bytes += item.length

    def transport_paused(self) -> None:
        self._transport_busy = True

    def transport_resumed(self) -> None:
        self._transport_busy = False
        self.drained_count += 1
        self._pump()

    def _pump(self) -> None:
        if self._tls is not None:
            self._pump_tls(self._tls)
            return
        transport = self._transport
        queue = self._queue
        while queue and not self._transport_busy and not transport.is_closing():
            if isinstance(queue[0], FileData):
                item = queue.popleft()
                assert isinstance(item, FileData)
                self._queued_bytes -= item.length
                self._queued_file_bytes -= item.length
                rest = self._send_file_data(item)
                if rest is not None:
                    queue.appendleft(rest)
                    self._queued_bytes += rest.length
                    self._queued_file_bytes += rest.length
                continue
            batch: list[bytes | memoryview] = []
            while queue and not isinstance(queue[0], FileData):
                data = queue.popleft()
                assert not isinstance(data, FileData)
                self._queued_bytes -= len(data)
                batch.append(data)
            transport.writelines(batch)  # may call transport_paused() before returning
        self._update_backlog()

    def _send_file_data(self, item: FileData) -> FileData | None:
        """Send what the socket takes; spill up to SPILL_BYTES more through the transport
        (it then reports when it has drained); return what is left, if anything."""
        volume = self.volume
        assert volume is not None, "FileData before an export was chosen"
        sent = 0
        if self._socket_fd >= 0:
            try:
                while sent < item.length:
                    n = os.sendfile(
                        self._socket_fd, volume.fd, item.offset + sent, item.length - sent
                    )
                    if n == 0:
                        break
                    sent += n
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:  # the client went away: the transport will report it
                log.debug("sendfile failed: %s", exc)
        if sent == item.length:
            return None
        spill = min(SPILL_BYTES, item.length - sent)
        self._transport.write(volume.read(item.offset + sent, spill))
        sent += spill
        return FileData(item.offset + sent, item.length - sent) if sent < item.length else None

    def _pump_tls(self, tls: TlsPipe) -> None:
        transport = self._transport
        while not transport.is_closing():
            records = tls.to_send()
            if records:
                transport.write(records)  # may call transport_paused() before returning
            if not self._queue or self._transport_busy:
                break
            self._encrypt_chunk(tls)
        self._update_backlog()

    def _encrypt_chunk(self, tls: TlsPipe) -> None:
        """Up to TLS_CHUNK_BYTES of the queue's head into the pipe (a FileData in slices)."""
        queue = self._queue
        budget = TLS_CHUNK_BYTES
        while queue and budget > 0:
            item = queue.popleft()
            if isinstance(item, FileData):
                volume = self.volume
                assert volume is not None, "FileData before an export was chosen"
                n = min(item.length, budget)
                if n < item.length:
                    queue.appendleft(FileData(item.offset + n, item.length - n))
                self._queued_file_bytes -= n
                tls.write(volume.read(item.offset, n))
            else:
                n = len(item)
                tls.write(item)
            self._queued_bytes -= n
            budget -= n

    def _update_backlog(self) -> None:
        # The transport's buffer counts too: _pump moves the whole queue into it at once.
        backlog = self._queued_bytes + self._transport.get_write_buffer_size()
        if not self._backlogged and backlog > QUEUE_HIGH_BYTES:
            self._backlogged = True
            self._on_backlog(True)
        elif self._backlogged and backlog <= QUEUE_LOW_BYTES:
            self._backlogged = False
            self._on_backlog(False)


def _size(item: Outgoing) -> int:
    return item.length if isinstance(item, FileData) else len(item)
