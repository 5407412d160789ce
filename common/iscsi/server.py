"""The asyncio adapter: one IscsiTargetConnection per TCP connection, volumes on disk.

    accept ─► serve() ─ read ≤ READ_CHUNK_BYTES ─► conn.receive_data()
                 ▲        └─ conn.next_event() until NEED_DATA:
                 │             ReadRequest  ─► Volume.read   ─► conn.read_done()
                 │             WriteRequest ─► Volume.write (+ sync if FUA) ─► conn.write_done()
                 │             FlushRequest ─► Volume.sync in the executor ─► conn.flush_done()
                 │             UnmapRequest ─► Volume.punch each extent ─► conn.write_done()
                 │             WriteSameRequest ─► Volume.zero, or the block written over
                 │                              the range in 1 MiB chunks ─► conn.write_done()
                 │             Closing      ─► send what is queued, close
                 └──────── write conn.data_to_send(), drain

Writes go straight to the Volume: they are NOT journalled yet (primaryd's WriteJournal
is the next step), so this serves standalone volumes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping

from common.iscsi.pdu import RemoteProtocolError
from common.iscsi.target import (
    NEED_DATA,
    Closing,
    FlushRequest,
    IscsiTargetConnection,
    LoggedIn,
    ReadRequest,
    TargetConfig,
    UnmapRequest,
    WriteRequest,
    WriteSameRequest,
)
from common.volume import Volume

log = logging.getLogger("iscsi")

READ_CHUNK_BYTES = 64 << 10
MAX_CONNECTIONS = 16
# WRITE SAME of a non-zero block: the buffer of repeated blocks written at a time
WRITE_SAME_CHUNK_BYTES = 1 << 20


class IscsiServer:
    def __init__(self, config: TargetConfig, volumes: Mapping[int, Volume]) -> None:
        self.config = config
        self.volumes = volumes
        self._tsih = itertools.count(1)
        self._connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._connections >= MAX_CONNECTIONS:
            log.warning("iscsi: refusing %s: %d connections already", peer, MAX_CONNECTIONS)
            writer.close()
            return
        self._connections += 1
        conn = IscsiTargetConnection(self.config, next(self._tsih))
        try:
            await self._serve(conn, reader, writer)
        except RemoteProtocolError as exc:
            log.warning("iscsi: %s broke the protocol: %s", peer, exc)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("iscsi: %s: connection lost: %s", peer, exc)
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(
        self,
        conn: IscsiTargetConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        while True:
            data = await reader.read(READ_CHUNK_BYTES)
            if not data:
                return
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, Closing):
                    writer.write(conn.data_to_send())
                    await writer.drain()
                    log.info("iscsi: closing %s", event.why)
                    return
                await self._do(conn, event)
                writer.write(conn.data_to_send())
                await writer.drain()
            writer.write(conn.data_to_send())
            await writer.drain()

    async def _do(self, conn: IscsiTargetConnection, event: object) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(event, LoggedIn):
            params = event.params
            log.info(
                "iscsi: %s session for %s (HeaderDigest %s, DataDigest %s, "
                "MaxRecvDataSegmentLength %d, MaxBurstLength %d, ImmediateData %s)",
                event.session_type,
                event.initiator_name,
                "CRC32C" if params.header_digest else "None",
                "CRC32C" if params.data_digest else "None",
                params.initiator_recv_data_segment_bytes,
                params.max_burst_bytes,
                params.immediate_data,
            )
        elif isinstance(event, ReadRequest):
            try:
                data = self.volumes[event.lun].read(event.offset, event.length)
            except OSError:
                conn.io_failed(event.itt)
            else:
                conn.read_done(event.itt, data)
        elif isinstance(event, WriteRequest):
            volume = self.volumes[event.lun]
            try:
                volume.write(event.offset, event.data)
                if event.fua:
                    await loop.run_in_executor(None, volume.sync)
            except OSError:
                conn.io_failed(event.itt)
            else:
                conn.write_done(event.itt)
        elif isinstance(event, (UnmapRequest, WriteSameRequest)):
            self._provision(conn, event)
        elif isinstance(event, FlushRequest):
            try:
                await loop.run_in_executor(None, self.volumes[event.lun].sync)
            except OSError:
                conn.io_failed(event.itt)
            else:
                conn.flush_done(event.itt)

    def _provision(
        self, conn: IscsiTargetConnection, event: UnmapRequest | WriteSameRequest
    ) -> None:
        """UNMAP and WRITE SAME, as Volume calls (when writes are journalled, trimmed(),
        zeroed() or wrote() goes before each, as NBD's TRIM and WRITE_ZEROES do)."""
        volume = self.volumes[event.lun]
        try:
            if isinstance(event, UnmapRequest):
                log.debug("iscsi: %s: unmap %s", volume.name, event.extents)
                for offset, length in event.extents:
                    volume.punch(offset, length)
            elif event.zeros:
                log.debug(
                    "iscsi: %s: write same zeros %d+%d", volume.name, event.offset, event.length
                )
                volume.zero(event.offset, event.length, allocate=True)
            else:
                log.debug("iscsi: %s: write same %d+%d", volume.name, event.offset, event.length)
                write_repeated(volume, event.offset, event.length, event.block)
        except OSError as exc:
            log.warning("iscsi: %s on %s failed: %s", type(event).__name__, volume.name, exc)
            conn.io_failed(event.itt)
        else:
            conn.write_done(event.itt)


def write_repeated(volume: Volume, offset: int, length: int, block: bytes) -> None:
    """Write `block` over [offset, offset + length) with one bounded buffer of copies."""
    chunk = block * max(1, min(length, WRITE_SAME_CHUNK_BYTES) // len(block))
    end = offset + length
    while offset < end:
        size = min(len(chunk), end - offset)
        volume.write(offset, memoryview(chunk)[:size])
        offset += size
