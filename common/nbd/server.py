"""Thin asyncio adapter around the sans-I/O NBD core.

Page-cache I/O runs inline on the loop; fdatasync (FLUSH, FUA) goes to the
volume's group syncer in an executor, so one client's flush never stalls the
others. Replies for one batch of received bytes go out with one writelines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import cast

from common.nbd import constants as c
from common.nbd.protocol import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    NbdServerConnection,
    Phase,
    RemoteProtocolError,
    Request,
    RequestRefused,
)
from common.syncer import GroupSyncer
from common.volume import Volume

log = logging.getLogger("journalpair.nbd")

_WRITE_BUFFER_HIGH_BYTES = 64 << 20


class Export:
    """A volume as served over NBD."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.syncer = GroupSyncer(volume.sync)
        self.info = ExportInfo(
            volume.name, volume.size, volume.read_only, description=f"journalpair {volume.name}"
        )


class NbdConnection(asyncio.Protocol):
    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._core = NbdServerConnection({n: e.info for n, e in server.exports.items()})
        self._export: Export | None = None
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its API.
        tcp = cast(asyncio.Transport, transport)
        self._transport = tcp
        peer = tcp.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        tcp.set_write_buffer_limits(high=_WRITE_BUFFER_HIGH_BYTES)
        self._server.connections.add(self)
        self._flush_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._core.phase is not Phase.CLOSED:
            log.info("client %s gone (%s)", self._peer, exc or "connection closed")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        core = self._core
        core.receive_data(data)
        try:
            while True:
                event = core.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Request):
                    self._request(event)
                elif isinstance(event, ExportChosen):
                    self._export = self._server.exports[event.export.name]
                    log.debug("client %s uses export %s", self._peer, event.export.name)
                elif isinstance(event, RequestRefused):
                    log.debug("client %s: refused: %s", self._peer, event.why)
                elif isinstance(event, Disconnect):
                    self._flush_out()
                    self._close_when_idle()
                    return
        except RemoteProtocolError as exc:
            log.warning("client %s broke the protocol: %s; dropping it", self._peer, exc)
            self._flush_out()
            assert self._transport is not None
            self._transport.close()
            return
        self._flush_out()

    def _flush_out(self) -> None:
        out = self._core.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)

    def _close_when_idle(self) -> None:
        if self._pending:
            task = asyncio.get_running_loop().create_task(self._drain_then_close())
            self._track(task)
        elif self._transport is not None:
            self._transport.close()

    async def _drain_then_close(self) -> None:
        await asyncio.gather(*(t for t in self._pending if t is not asyncio.current_task()))
        if self._transport is not None:
            self._transport.close()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._pending.add(task)
        self._server.pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(self._server.pending.discard)

    def _request(self, req: Request) -> None:
        export = self._export
        assert export is not None
        volume = export.volume
        try:
            if req.cmd == c.Cmd.READ:
                self._read(volume, req)
                return
            if req.cmd == c.Cmd.WRITE:
                volume.write(req.offset, req.payload)
            elif req.cmd == c.Cmd.TRIM:
                volume.punch(req.offset, req.length)
            elif req.cmd == c.Cmd.WRITE_ZEROES:
                allocate = bool(req.flags & c.CMD_FLAG_NO_HOLE)
                if req.flags & c.CMD_FLAG_FAST_ZERO and not volume.zero_is_fast(allocate=allocate):
                    self._core.reply_error(req, c.ENOTSUP, "cannot zero fast")
                    return
                volume.zero(req.offset, req.length, allocate=allocate)
            elif req.cmd == c.Cmd.CACHE:
                volume.advise_willneed(req.offset, req.length)
            elif req.cmd == c.Cmd.BLOCK_STATUS:
                extents = volume.extents(req.offset, req.length, max_extents=256)
                flags = c.STATE_HOLE | c.STATE_ZERO
                self._core.reply_block_status(
                    req, [(e.length, flags if e.hole else 0) for e in extents]
                )
                return
        except OSError as exc:
            log.error(
                "export %s: %s failed at %d+%d: %s",
                volume.name,
                req.cmd.name,
                req.offset,
                req.length,
                exc,
            )
            self._core.reply_error(req, c.ENOSPC if exc.errno == 28 else c.EIO, str(exc))
            return
        if req.cmd == c.Cmd.FLUSH or req.fua:
            self._track(asyncio.get_running_loop().create_task(self._sync_then_reply(export, req)))
            return
        self._core.reply_ok(req)

    def _read(self, volume: Volume, req: Request) -> None:
        if not self._core.structured or req.flags & c.CMD_FLAG_DF:
            self._core.reply_read(req, [(req.offset, volume.read(req.offset, req.length))])
            return
        pieces: list[tuple[int, bytes | int]] = []
        for e in volume.extents(req.offset, req.length, max_extents=64):
            pieces.append((e.offset, e.length if e.hole else volume.read(e.offset, e.length)))
        covered = pieces[-1][0] + _piece_len(pieces[-1][1])
        end = req.offset + req.length
        if covered < end:
            pieces.append((covered, volume.read(covered, end - covered)))
        self._core.reply_read(req, pieces)

    async def _sync_then_reply(self, export: Export, req: Request) -> None:
        try:
            await export.syncer.sync()
        except OSError as exc:
            log.error("export %s: fdatasync failed: %s", export.volume.name, exc)
            self._core.reply_error(req, c.EIO, f"fdatasync: {exc}")
        else:
            self._core.reply_ok(req)
        self._flush_out()


def _piece_len(piece: bytes | int) -> int:
    return piece if isinstance(piece, int) else len(piece)


class NbdServer:
    """Serves a set of exports on one TCP address."""

    def __init__(self, volumes: Mapping[str, Volume]) -> None:
        self.exports = {name: Export(v) for name, v in volumes.items()}
        self.connections: set[NbdConnection] = set()
        self.pending: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: NbdConnection(self), host, port)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        """Stop listening, answer what is in flight, close every connection."""
        if self._server is not None:
            self._server.close()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
