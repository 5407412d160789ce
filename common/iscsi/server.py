"""The asyncio adapter: one IscsiTargetConnection per TCP connection, LUNs on Volumes, and
every host write through the same WriteJournal path as NBD writes (common.nbd.server).

    accept ─► over iscsi.max_connections? ─► close
      │
      ▼ serve: read ≤ READ_CHUNK_BYTES ─► conn.receive_data() ─► events until NEED_DATA
          ReadRequest   ─► Volume.read (inline: page cache, ≤ 4 MiB) ─► conn.read_done()
                             over SEND_BATCH_BYTES queued: written and drained first
                             (a window of 4 MiB READs is not held in memory at once)
          WriteRequest  ─► a HostChange; consecutive ones are one batch (≤ the command window)
                             refused if the LUN is read-only now (WRITE PROTECTED)
                             journal.wrote/trimmed/zeroed ... journal.flush_records()
                             Volume.write/punch/zero, inline  (failed() if one fails)
                             FUA: volume sync + journal.sync() ─► done
                             else: inflow control (ack_delay_s) ─► done
          FlushRequest  ─► volume sync + journal.sync() ─► conn.flush_done()
          Closing       ─► send what is queued, close
      └── write conn.data_to_send(), drain: a slow reader stops being read
    _keep_alive() beside it: conn.tick(now) every tick_interval_s; a Closing (an unanswered
               NOP-In ping) aborts the transport, which ends the read above

The record of a write is in the journal file before the write can be on the volume, and no
await falls between them, so a SIGKILL leaves at most the last batch's records without their
writes (recovery checks those), never a write without its record.

Host access follows the pair state (set_writable / set_read_only): the LUN table the cores
read (TargetConfig.luns, one dict shared by every connection) gets a LunInfo with read_only
set, so a new WRITE gets DATA PROTECT / WRITE PROTECTED and MODE SENSE shows WP; a write
whose data was still arriving is checked again when it runs. Batches run on the loop, so no
host write reaches a volume after set_read_only() returns.

UNMAP and WRITE SAME map to a HostChange too (host_change()): TRIM changes (a hole per
extent), a ZERO change (a zero block, kept allocated) or WRITE changes (the block repeated,
in 1 MiB pieces); journaling, applying, FUA and inflow control are then the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, cast

from common.iscsi import scsi
from common.iscsi.chap import ChapSecrets
from common.iscsi.pdu import RemoteProtocolError
from common.iscsi.target import (
    NEED_DATA,
    Closing,
    Event,
    FlushRequest,
    IscsiTargetConnection,
    LoggedIn,
    ReadRequest,
    TargetConfig,
    UnmapRequest,
    WriteRequest,
    WriteSameRequest,
)
from common.iscsi.textkeys import TargetLimits
from common.nbd.constants import Cmd
from common.nbd.guard import LogLimiter
from common.nbd.iostats import HostIoStats
from common.nbd.server import WriteJournal
from common.syncer import GroupSyncer
from common.volume import Volume

log = logging.getLogger("journalpair.iscsi")

# a receive takes up to this much: a QD32 window of 4 KiB writes is one receive, one batch
READ_CHUNK_BYTES = 256 << 10
# READ data queued beyond this is sent (and drained) before the next command runs
SEND_BATCH_BYTES = 1 << 20
# drain() waits while the transport holds more than this: room for a few 1 MiB READs, so
# the next READ is read from the volume while the last ones are still going out
SEND_BUFFER_BYTES = 4 << 20
MAX_CONNECTIONS_DEFAULT = 16
# A NOP-In ping to an initiator silent this long; dropped without an answer this long after
NOP_IN_INTERVAL_S = 5.0
NOP_IN_TIMEOUT_S = 10.0
STOP_DRAIN_S = 10.0  # on stop, how long a connection gets to finish what it is doing
# WRITE SAME of a non-zero block: journaled and written as pieces of copies this big
WRITE_SAME_CHUNK_BYTES = 1 << 20


class ChangeKind(Enum):
    WRITE = "write"
    TRIM = "trim"  # deallocated (a hole), reads back as zeros: UNMAP, WRITE SAME with UNMAP
    ZERO = "zero"  # zeros, kept allocated: WRITE SAME of a zero block without UNMAP


# slots, not frozen: made once a command (a frozen dataclass costs ~2 µs more to build)
@dataclass(slots=True)
class Change:
    kind: ChangeKind
    offset: int
    length: int
    data: bytes = b""  # WRITE only


# slots, not frozen: made once a command (a frozen dataclass costs ~2 µs more to build)
@dataclass(slots=True)
class HostChange:
    """One host command that changes a LUN: journaled, applied, then answered by ``done``
    (the core's reply for that command) or by io_failed / io_refused."""

    itt: int
    lun: int
    changes: tuple[Change, ...]
    fua: bool
    done: Callable[[int], None]


def host_change(conn: IscsiTargetConnection, event: Event) -> HostChange | None:
    """The change a core event makes to a LUN, or None for an event that changes nothing."""
    if isinstance(event, WriteRequest):
        change = Change(ChangeKind.WRITE, event.offset, len(event.data), event.data)
        return HostChange(event.itt, event.lun, (change,), event.fua, conn.write_done)
    if isinstance(event, UnmapRequest):  # UNMAP, WRITE SAME of zeros with its UNMAP bit
        log.debug("LUN %d: unmap %s", event.lun, event.extents)
        trims = tuple(Change(ChangeKind.TRIM, at, length) for at, length in event.extents)
        return HostChange(event.itt, event.lun, trims, False, conn.write_done)
    if isinstance(event, WriteSameRequest):
        what = "zeros" if event.zeros else "a block"
        log.debug("LUN %d: write same %s %d+%d", event.lun, what, event.offset, event.length)
        if event.zeros:
            changes: tuple[Change, ...] = (Change(ChangeKind.ZERO, event.offset, event.length),)
        else:
            changes = tuple(
                Change(ChangeKind.WRITE, at, len(data), data)
                for at, data in repeated_block(event.offset, event.length, event.block)
            )
        return HostChange(event.itt, event.lun, changes, False, conn.write_done)
    return None


def repeated_block(offset: int, length: int, block: bytes) -> Iterator[tuple[int, bytes]]:
    """[offset, offset + length) as (offset, data) pieces of ``block`` repeated, each at most
    WRITE_SAME_CHUNK_BYTES: the full pieces share one buffer (a WRITE SAME is ≤ 4 MiB)."""
    chunk = block * max(1, min(length, WRITE_SAME_CHUNK_BYTES) // len(block))
    end = offset + length
    while offset < end:
        size = min(len(chunk), end - offset)
        yield offset, chunk if size == len(chunk) else chunk[:size]
        offset += size


class _Counted(NamedTuple):
    """What HostIoStats counts of an answered command (it reads NBD command kinds)."""

    cmd: Cmd
    length: int


_CMD_OF_CHANGE = {
    ChangeKind.WRITE: Cmd.WRITE,
    ChangeKind.TRIM: Cmd.TRIM,
    ChangeKind.ZERO: Cmd.WRITE_ZEROES,
}


@dataclass(slots=True)
class Lun:
    volume: Volume
    syncer: GroupSyncer
    # volumes[].read_only: hosts never write it, whatever the pair state.
    always_read_only: bool
    stats: HostIoStats | None


class IscsiServer:
    """One target (``config.iqn``) on one TCP address; LUN n is ``volumes[n]``."""

    def __init__(
        self,
        iqn: str,
        volumes: Sequence[Volume],
        journal: WriteJournal | None = None,
        *,
        read_only: bool = False,
        always_read_only: Collection[str] = (),
        max_connections: int = MAX_CONNECTIONS_DEFAULT,
        stats: Mapping[str, HostIoStats] | None = None,
        limits: TargetLimits | None = None,
        chap: ChapSecrets | None = None,
        nop_in_interval_s: float = NOP_IN_INTERVAL_S,
        nop_in_timeout_s: float = NOP_IN_TIMEOUT_S,
    ) -> None:
        """``always_read_only``: names of the volumes hosts may never write (config
        volumes[].read_only), whatever set_writable says later. ``stats``: per volume name,
        counted as commands are answered (metrics on; the NBD export's, so a volume's host
        I/O is one series whatever the protocol)."""
        self.luns: dict[int, scsi.LunInfo] = {}
        self._luns: dict[int, Lun] = {}
        for number, volume in enumerate(volumes):
            self._luns[number] = Lun(
                volume,
                GroupSyncer(volume.sync),
                volume.name in always_read_only or volume.read_only,
                (stats or {}).get(volume.name),
            )
            self.luns[number] = scsi.LunInfo(volume.size, serial=lun_serial(iqn, number))
        # The cores read self.luns at every command: what _apply_access puts there (read_only
        # here too) applies to every session at once.
        self.config = TargetConfig(
            iqn,
            self.luns,
            portal="",
            limits=limits or TargetLimits(),
            nop_in_interval_s=nop_in_interval_s,
            nop_in_timeout_s=nop_in_timeout_s,
            chap=chap,
        )
        self.journal = journal
        self.max_connections = max_connections
        self._apply_access(writable=not read_only)
        self._tsih = itertools.count(1)
        self._connections: dict[asyncio.Task[None], bool] = {}  # task -> waiting for bytes
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._io_errors = LogLimiter()
        self._refusals = LogLimiter()
        self._auth_failures = LogLimiter()

    # -- host access ----------------------------------------------------------------------

    def set_writable(self, journal: WriteJournal) -> None:
        """Hosts may write from now on, each write journaled in ``journal`` (a takeover, or
        the primary's swap abandoned). A volume configured read-only stays so."""
        self.journal = journal
        self._apply_access(writable=True)

    def set_read_only(self) -> None:
        """Hosts may no longer write (an S-VOL, a primary handing over in a swap). Sessions
        stay up; their next write is refused with WRITE PROTECTED."""
        self.journal = None
        self._apply_access(writable=False)

    def _apply_access(self, *, writable: bool) -> None:
        for number, lun in self._luns.items():
            read_only = not writable or lun.always_read_only
            self.luns[number] = dataclasses.replace(self.luns[number], read_only=read_only)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self.handle, host, port)
        bound = self._server.sockets[0].getsockname()
        # port 0 picks a free port: SendTargets must name the one bound
        self.config = dataclasses.replace(self.config, portal=f"{bound[0]}:{bound[1]}")
        return bound[0], bound[1]

    async def stop(self) -> None:
        """Stop listening; connections waiting for bytes close now, the others once their
        commands are answered (at most STOP_DRAIN_S)."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task, waiting in list(self._connections.items()):
            if waiting:
                task.cancel()
        if self._connections:
            _, late = await asyncio.wait(list(self._connections), timeout=STOP_DRAIN_S)
            for task in late:
                log.warning(
                    "an initiator's commands were not done in %.0f s; closing it", STOP_DRAIN_S
                )
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = self._peer_of(writer)
        task = asyncio.current_task()
        assert task is not None
        if self._stopping or len(self._connections) >= self.max_connections:
            why = "the server stops" if self._stopping else "iscsi.max_connections reached"
            _log_limited(self._refusals, logging.WARNING, "initiator %s refused: %s", peer, why)
            writer.close()
            return
        self._connections[task] = True
        writer.transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)
        conn = IscsiTargetConnection(self.config, next(self._tsih))
        try:
            async with asyncio.TaskGroup() as tasks:  # the pinger's errors are not lost
                pinger = tasks.create_task(self._keep_alive(conn, writer, peer))
                try:
                    await self._serve(task, conn, reader, writer)
                except RemoteProtocolError as exc:
                    log.warning("initiator %s broke the protocol: %s; dropping it", peer, exc)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    log.info("initiator %s gone (%s)", peer, exc)
                except asyncio.CancelledError:
                    log.info("initiator %s: connection closed, the server stops", peer)
                finally:
                    pinger.cancel()
        finally:
            del self._connections[task]
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
                log.warning("initiator %s dropped: %s", peer, closing.why)
                writer.transport.abort()
                return

    async def _serve(
        self,
        task: asyncio.Task[None],
        conn: IscsiTargetConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        async def send() -> None:
            writer.write(conn.data_to_send())
            await writer.drain()

        while not self._stopping:
            self._connections[task] = True
            data = await reader.read(READ_CHUNK_BYTES)
            self._connections[task] = False
            if not data:
                return
            arrived_ns = time.monotonic_ns()
            conn.receive_data(data)
            events: list[Event] = []
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                events.append(cast(Event, event))
            closing = await self.run_events(conn, events, arrived_ns, send)
            await send()
            if closing is not None:
                peer = self._peer_of(writer)
                if closing.authentication_failed:  # a wrong secret, or a password guesser
                    who = f"{peer} ({conn.params.initiator_name or 'no InitiatorName'})"
                    what = "initiator %s failed authentication, %s"
                    _log_limited(self._auth_failures, logging.WARNING, what, who, closing.why)
                else:
                    log.info("initiator %s: closing: %s", peer, closing.why)
                return

    # -- commands -------------------------------------------------------------------------

    async def run_events(
        self,
        conn: IscsiTargetConnection,
        events: Sequence[Event],
        arrived_ns: int = 0,
        send: Callable[[], Awaitable[None]] | None = None,
    ) -> Closing | None:
        """Run one receive's events in order (consecutive changes as one journal batch);
        the replies are queued in ``conn``, and ``send`` sends them whenever more than
        SEND_BATCH_BYTES are queued. Returns the Closing event, if any."""
        batch: list[HostChange] = []
        for event in events:
            change = host_change(conn, event)
            if change is not None:
                batch.append(change)
                continue
            if batch:
                await self.run_changes(conn, batch, arrived_ns)
                batch = []
            if isinstance(event, Closing):
                return event
            await self._run_other(conn, event, arrived_ns)
            if send is not None and conn.bytes_to_send > SEND_BATCH_BYTES:
                await send()
        if batch:
            await self.run_changes(conn, batch, arrived_ns)
        return None

    async def _run_other(self, conn: IscsiTargetConnection, event: Event, arrived_ns: int) -> None:
        if isinstance(event, LoggedIn):
            params = event.params
            log.info(
                "%s session for %s (HeaderDigest %s, DataDigest %s, "
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
            lun = self._luns[event.lun]
            try:
                data = lun.volume.read(event.offset, event.length)
            except OSError as exc:
                self._io_error(lun, f"read failed at {event.offset}+{event.length}: {exc}")
                conn.io_failed(event.itt)
            else:
                conn.read_done(event.itt, data)
            self._count(lun, Cmd.READ, event.length, arrived_ns)
        elif isinstance(event, FlushRequest):
            lun = self._luns[event.lun]
            if await self._sync(lun):
                conn.flush_done(event.itt)
            else:
                conn.io_failed(event.itt)
            self._count(lun, Cmd.FLUSH, 0, arrived_ns)

    async def run_changes(
        self, conn: IscsiTargetConnection, batch: Sequence[HostChange], arrived_ns: int = 0
    ) -> None:
        """The one place where host changes reach the volumes: journal the batch, put the
        records in the journal file, then change the volumes (see WriteJournal: the NBD
        server's order), then answer. No await until every change is made."""
        allowed = []
        for change in batch:
            if self.luns[change.lun].read_only:  # access withdrawn while its data arrived
                conn.io_refused(change.itt, scsi.WRITE_PROTECTED)
            else:
                allowed.append(change)
        journal = self.journal
        if journal is not None:
            for change in allowed:
                self._journal(journal, self._luns[change.lun].volume.name, change)
            journal.flush_records()
        made = [change for change in allowed if self._apply(conn, journal, change)]
        delay_s = journal.ack_delay_s if journal is not None else 0.0
        later = [change for change in made if not change.fua]
        for change in made:
            if change.fua:
                lun = self._luns[change.lun]
                if await self._sync(lun):
                    change.done(change.itt)
                else:
                    conn.io_failed(change.itt)
                self._count_change(change, arrived_ns)
        if later and delay_s > 0:
            # Inflow control: the writes are made and journaled; the host's acknowledgement
            # waits (this connection is not read meanwhile, which slows it the same way).
            await asyncio.sleep(delay_s)
        for change in later:
            change.done(change.itt)
            self._count_change(change, arrived_ns)

    @staticmethod
    def _journal(journal: WriteJournal, volume: str, host: HostChange) -> None:
        for change in host.changes:
            if change.kind is ChangeKind.WRITE:
                journal.wrote(volume, change.offset, change.data)
            elif change.kind is ChangeKind.TRIM:
                journal.trimmed(volume, change.offset, change.length)
            else:
                journal.zeroed(volume, change.offset, change.length)

    def _apply(
        self, conn: IscsiTargetConnection, journal: WriteJournal | None, host: HostChange
    ) -> bool:
        """Make the changes on the volume; False (journal told, host answered) if one failed."""
        lun = self._luns[host.lun]
        volume = lun.volume
        for at, change in enumerate(host.changes):
            try:
                if change.kind is ChangeKind.WRITE:
                    volume.write(change.offset, change.data)
                elif change.kind is ChangeKind.TRIM:
                    volume.punch(change.offset, change.length)
                else:
                    volume.zero(change.offset, change.length, allocate=True)
            except OSError as exc:
                if journal is not None:  # this one and those not made: content unknown
                    for left in host.changes[at:]:
                        journal.failed(volume.name, left.offset, left.length)
                self._io_error(
                    lun, f"{change.kind.value} failed at {change.offset}+{change.length}: {exc}"
                )
                conn.io_failed(host.itt)
                return False
        return True

    async def _sync(self, lun: Lun) -> bool:
        """SYNCHRONIZE CACHE / FUA: the volume's writes and the journal's records durable."""
        journal = self.journal
        try:
            if journal is None:
                await lun.syncer.sync()
            else:
                await asyncio.gather(lun.syncer.sync(), journal.sync())
        except OSError as exc:
            self._io_error(lun, f"fdatasync failed: {exc}")
            return False
        return True

    @staticmethod
    def _peer_of(writer: asyncio.StreamWriter) -> str:
        address = writer.get_extra_info("peername")
        return f"{address[0]}:{address[1]}" if address else "?"

    def _io_error(self, lun: Lun, what: str) -> None:
        """A host command failed on the volume (the initiator got MEDIUM ERROR); limited."""
        _log_limited(self._io_errors, logging.ERROR, "LUN of volume %s: %s", lun.volume.name, what)

    def _count(self, lun: Lun, cmd: Cmd, length: int, arrived_ns: int) -> None:
        if lun.stats is not None:
            lun.stats.answered((_Counted(cmd, length),), time.monotonic_ns() - arrived_ns)

    def _count_change(self, host: HostChange, arrived_ns: int) -> None:
        lun = self._luns[host.lun]
        for change in host.changes:
            self._count(lun, _CMD_OF_CHANGE[change.kind], change.length, arrived_ns)


def _log_limited(limiter: LogLimiter, level: int, message: str, *args: object) -> None:
    """One line per event, at most a few per interval; those held back are counted, and the
    count is logged before the next line (a failing disk or a connect flood: not a line each)."""
    now = asyncio.get_running_loop().time()
    held_back = limiter.summary(now)
    if held_back:
        log.log(level, "%d more like the next line were not logged one by one", held_back)
    if limiter.allow(now):
        log.log(level, message, *args)


def lun_serial(iqn: str, lun: int) -> str:
    """A serial (and so a VPD 0x83 identity) that stays the same across restarts."""
    return f"jp{hashlib.sha256(iqn.encode()).hexdigest()[:12]}l{lun}"
