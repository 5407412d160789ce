"""The asyncio adapter: one IscsiTargetConnection per TCP connection, volumes on disk.

    accept ─► serve() ─ read ≤ READ_CHUNK_BYTES ─► conn.receive_data()
                 ▲        └─ conn.next_event() until NEED_DATA:
                 │             ReadRequest  ─► Volume.read   ─► conn.read_done()
                 │             WriteRequest ─► Volume.write (+ sync if FUA) ─► conn.write_done()
                 │             FlushRequest ─► Volume.sync in the executor ─► conn.flush_done()
                 │             Closing      ─► send what is queued, close
                 └──────── write conn.data_to_send(), drain
    _keep_alive() beside it: conn.tick(now) every tick_interval_s; a Closing (an unanswered
                 NOP-In ping) aborts the transport, which ends the read above

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
    WriteRequest,
)
from common.volume import Volume

log = logging.getLogger("iscsi")

READ_CHUNK_BYTES = 64 << 10
MAX_CONNECTIONS = 16


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
            async with asyncio.TaskGroup() as tasks:
                pinger = tasks.create_task(self._keep_alive(conn, writer, peer))
                try:
                    await self._serve(conn, reader, writer)
                except RemoteProtocolError as exc:
                    log.warning("iscsi: %s broke the protocol: %s", peer, exc)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    log.info("iscsi: %s: connection lost: %s", peer, exc)
                finally:
                    pinger.cancel()
        finally:
            self._connections -= 1
            writer.close()
            # cancelled here at shutdown: end quietly (3.11's StreamReaderProtocol logs a
            # traceback for a handler task that ends cancelled)
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _keep_alive(
        self, conn: IscsiTargetConnection, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        """Drives conn.tick(): NOP-In pings to a silent initiator; an unanswered ping drops
        the connection (aborting the transport ends _serve's read)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(conn.tick_interval_s)
            closing = conn.tick(loop.time())
            writer.write(conn.data_to_send())
            if closing is not None:
                log.warning("iscsi: dropping %s: %s", peer, closing.why)
                writer.transport.abort()
                return

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
                "MaxRecvDataSegmentLength %d, MaxBurstLength %d, ImmediateData %s, "
                "InitialR2T %s)",
                event.session_type,
                event.initiator_name,
                "CRC32C" if params.header_digest else "None",
                "CRC32C" if params.data_digest else "None",
                params.initiator_recv_data_segment_bytes,
                params.max_burst_bytes,
                params.immediate_data,
                params.initial_r2t,
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
        elif isinstance(event, FlushRequest):
            try:
                await loop.run_in_executor(None, self.volumes[event.lun].sync)
            except OSError:
                conn.io_failed(event.itt)
            else:
                conn.flush_done(event.itt)
