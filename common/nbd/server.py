"""Thin asyncio adapter around the sans-I/O NBD core.

Page-cache I/O runs inline on the loop; fdatasync (FLUSH, FUA) goes to the
volume's group syncer in an executor, so one client's flush never stalls the
others. Replies for one batch of received bytes go out with one writelines.

Hostile clients (common.nbd.guard decides, this module acts):

    accept ─► refused (nbd.allow, nbd.max_connections)? ─► abort, no greeting, no buffer
        │
        ▼ NbdConnection (receive buffer allocated only now)
    every WATCH_TICK_S: each connection's ClientWatch ─► overdue? ─► log (limited), abort

Memory (common.nbd.budget decides, this module acts): every connection tells the server's
MemoryBudget what it holds (reply bytes in memory, receive buffer beyond the standard one)
after it hands replies to its sender and when its transport drains. It is held (reading
paused, the rest of its requests left buffered, the same mechanism as a full reply backlog):

    serving, replies made reach its room (share left + pool left) ─► held, waits
    a WRITE header asks for a receive buffer bigger than its room ─► held, waits
    pool bytes freed (another connection drained, or went) ─► woken: serve the rest, read

uvloop (libuv) survives EMFILE in accept by itself: it accepts and closes the pending
connections with a reserve descriptor, and keeps listening.

TLS, after the core's StartTls event (the ACK already sent in plaintext):

    transport ─► get_buffer (TLS_RECEIVE_BYTES) ─► TlsPipe.feed ─► read_into the core's
        buffer, a room-full at a time, each served before the next (as a recv would be)
    core.data_to_send ─► ReplySender (encrypts; FileData read, 4 MiB a turn) ─► transport

Not loop.start_tls(): it needs a plain Protocol and reports a failed handshake to nobody
(see common.tlspipe); a memory-BIO pipe lets us log who failed and why. The plaintext
path (receive into the core's buffer, sendfile for big reads) is untouched.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import ssl
import time
from collections.abc import Collection, Mapping
from typing import Protocol, cast

from common.config import NbdConfig
from common.nbd import constants as c
from common.nbd.budget import MemoryBudget
from common.nbd.guard import ClientWatch, LogLimiter, refusal
from common.nbd.iostats import HostIoStats
from common.nbd.protocol import (
    NEED_DATA,
    RECEIVE_BUFFER_BYTES,
    Disconnect,
    ExportChosen,
    ExportInfo,
    FileData,
    NbdServerConnection,
    Phase,
    Piece,
    RemoteProtocolError,
    Request,
    RequestRefused,
    StartTls,
    TlsMode,
    TlsRequired,
)
from common.nbd.sender import ReplySender
from common.nbd.tls import handshake_failure_cause
from common.syncer import GroupSyncer
from common.tlspipe import TlsPipe
from common.volume import Volume

log = logging.getLogger("journalpair.nbd")

_HOLE_CHUNK_MIN_BYTES = 64 << 10
_JOURNALED = (c.Cmd.WRITE, c.Cmd.TRIM, c.Cmd.WRITE_ZEROES)
_READ, _WRITE, _FLUSH, _FUA = c.Cmd.READ, c.Cmd.WRITE, c.Cmd.FLUSH, c.CMD_FLAG_FUA
_TRIM, _WRITE_ZEROES = c.Cmd.TRIM, c.Cmd.WRITE_ZEROES
_OPTS = frozenset(int(opt) for opt in c.Opt)
_HANDSHAKING = (Phase.CLIENT_FLAGS, Phase.OPTIONS, Phase.TLS_HANDSHAKE)
# Requests journaled together, then executed: records reach the journal file in one write,
# and a crash can leave at most this many records without their volume writes.
JOURNAL_BATCH_REQUESTS = 256
# FLUSH and FUA requests of one connection waiting for their sync: past this many, the
# connection stops being read until a sync round answers them (a flood of FLUSH costs a
# bounded list, not a task each).
SYNC_WAITERS_MAX = 1024
# Inflow control: write replies held back per connection at most; beyond, a write is answered
# at once (a client pipelining that much is not slowed by a few ms anyway).
DELAYED_REPLIES_MAX = 1024
STOP_DRAIN_S = 10.0  # on SIGTERM, how long clients get to read the replies owed to them
_SENDFILE_MIN_BYTES = 128 << 10  # below this one pread + write is cheaper than a syscall dance
# READ reply bytes made before the sender gets them and the backlog is checked: without a
# check inside one receive, a 256 KiB buffer of 127 KiB READs makes ~1.2 GiB of replies.
REPLY_CHUNK_BYTES = 4 << 20
WATCH_TICK_MAX_S = 1.0  # how often deadlines are checked: at most this, less for short timeouts
TLS_RECEIVE_BYTES = 256 << 10  # TLS records are received here, then decrypted into the core


class WriteJournal(Protocol):
    """Where host writes go besides the volume (the primary's master journal).

    For each batch of at most JOURNAL_BATCH_REQUESTS requests: wrote/trimmed/zeroed for
    its writes, in order, then flush_records(), then the volume I/O. A record is in the
    journal file before its data can be on the volume, so a SIGKILL leaves at most the last
    batch's records without their writes (recovery checks those), never a write without
    its record. Never raises: replication trouble changes the pair state, it does not fail
    host I/O (invariant 4).
    """

    def wrote(self, volume: str, offset: int, payload: bytes | memoryview) -> None: ...
    def trimmed(self, volume: str, offset: int, length: int) -> None: ...
    def zeroed(self, volume: str, offset: int, length: int) -> None: ...
    def failed(self, volume: str, offset: int, length: int) -> None:
        """The volume write after the record failed: the region's content is unknown."""

    def flush_records(self) -> None:
        """Records so far into the journal file (page cache), before the volume I/O."""

    async def sync(self) -> None:
        """FLUSH/FUA: records so far are durable when this returns (OSError if not)."""

    # Inflow control: hold the replies to this batch's writes (without FUA) this long, 0 for
    # none. Read once per batch; the server awaits it, it never blocks the loop.
    ack_delay_s: float


class Export:
    """A volume as served over NBD."""

    def __init__(
        self,
        volume: Volume,
        journal: WriteJournal | None,
        read_only: bool,
        *,
        always_read_only: bool = False,
        stats: HostIoStats | None = None,
    ) -> None:
        self.volume = volume
        self.journal = journal
        self.syncer = GroupSyncer(volume.sync)
        # Requests, bytes and latency per op (metrics on), counted as each is answered.
        self.stats = stats
        # volumes[].read_only: hosts never write it, whatever the pair state.
        self.always_read_only = always_read_only
        self.info = ExportInfo(
            volume.name,
            volume.size,
            read_only or self.host_read_only,
            description=f"journalpair {volume.name}",
        )

    @property
    def host_read_only(self) -> bool:
        """Read-only even when the pair state lets hosts write."""
        return self.always_read_only or self.volume.read_only


class NbdConnection(asyncio.BufferedProtocol):
    # Set in connection_made once the client is admitted: a refused client costs no buffer.
    _core: NbdServerConnection
    watch: ClientWatch

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._tls: TlsPipe | None = None  # after NBD_OPT_STARTTLS
        self._tls_in = memoryview(b"")
        self._told_tls_required = False
        self._export: Export | None = None
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self._pending: set[asyncio.Task[None]] = set()
        # FLUSH/FUA requests (payload dropped) for the next sync round, each with when it
        # arrived (metrics), and the round's task.
        self._sync_waiting: list[tuple[Request, int]] = []
        self._sync_rounds: asyncio.Task[None] | None = None
        self._waiting_for_sync = False  # held: too many requests wait for a sync
        # Inflow control: write replies (payload dropped) with the loop time they are due at,
        # oldest first, and the one task that sends them.
        self._delayed: collections.deque[tuple[float, Request]] = collections.deque()
        self._delay_task: asyncio.Task[None] | None = None
        self._sender: ReplySender | None = None
        self._closing = False
        self._received_bytes = 0
        self._dropped = False
        self._held = False  # requests left in the receive buffer until the backlog drains
        self._waiting_for_memory = False  # held by the server's memory budget
        self._receive_granted_bytes = 0  # receive buffer growth the budget granted
        self._lost = False
        # When the loop last received bytes: what the requests they completed wait from
        # (held requests keep it: reading is paused until they are served).
        self._arrived_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its API.
        tcp = cast(asyncio.Transport, transport)
        self._transport = tcp
        peer = tcp.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        server = self._server
        why = refusal(
            peer[0] if peer else "?",
            len(server.connections),
            server.limits.max_connections,
            server.limits.allow,
        )
        if why is not None:
            self._dropped = True
            tcp.abort()  # before any byte: the greeting is not even built
            server.refused(self.peer, why)
            return
        self._core = NbdServerConnection(
            {n: e.info for n, e in server.exports.items()}, tls=server.tls_mode
        )
        limits = server.limits
        self.watch = ClientWatch(
            asyncio.get_running_loop().time(), limits.handshake_timeout_s, limits.stall_timeout_s
        )
        self._sender = ReplySender(tcp, self._on_reply_backlog)
        server.connections.add(self)
        self._flush_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._server.connections.discard(self)
        self._server.memory_released(self)
        if self._dropped:
            return
        phase = self._core.phase
        why = exc or "connection closed"
        if phase is Phase.TRANSMISSION:
            log.info("client %s gone (%s)", self.peer, why)
        elif phase is not Phase.CLOSED:  # a flood of connect-and-go: limited
            self._server.log_drop(self.peer, f"gone during the handshake ({why})", logging.INFO)

    def overdue(self, now: float) -> str | None:
        """Why the watch says this client must go now (see common.nbd.guard), or None."""
        core, sender, transport = self._core, self._sender, self._transport
        if self._dropped or sender is None or transport is None or transport.is_closing():
            return None
        # Waiting for the budget or for a sync round mid-request is the server's doing, not
        # a stall; replies left unread are the client's.
        server_busy = self._waiting_for_memory or self._sync_rounds is not None
        return self.watch.overdue(
            now,
            handshaking=core.phase in _HANDSHAKING,
            busy=(core.mid_request and not server_busy) or not sender.idle,
            progress=(
                self._received_bytes,
                sender.drained_count,
                transport.get_write_buffer_size(),
            ),
        )

    def drop(self) -> None:
        """Close at once, without answering (the client is not playing its part)."""
        self._dropped = True
        self.abort()

    def close(self) -> None:
        """Stop reading requests; close once every reply owed has been handed over."""
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
        self._close_if_done()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close_if_done(self) -> None:
        if not self._closing or self._pending or self._transport is None:
            return
        if self._sender is None or self._sender.idle:
            if self._tls is not None and not self._transport.is_closing():
                self._transport.write(self._tls.close())  # the spec: end TLS, then TCP
            self._transport.close()  # the transport still sends what it holds

    def pause_writing(self) -> None:
        if self._sender is not None:
            self._sender.transport_paused()

    def resume_writing(self) -> None:
        if self._sender is not None:
            self._sender.transport_resumed()
            self._account_memory()
            self.memory_freed()  # its own replies drained: within its room again, maybe
        self._close_if_done()

    def memory_freed(self) -> None:
        """The budget has room again (called by the server): try to go on, next loop turn."""
        if self._waiting_for_memory:
            asyncio.get_running_loop().call_soon(self._serve_held)

    def _account_memory(self, receive_bytes: int | None = None) -> None:
        """Tell the budget what this connection holds: replies in memory and its receive
        buffer beyond the standard one (or ``receive_bytes`` of it, a growth being asked)."""
        if self._lost or self._sender is None:
            return
        if receive_bytes is None:
            now = self._core.buffer_bytes - RECEIVE_BUFFER_BYTES
            receive_bytes = max(0, now, self._receive_granted_bytes)
        self._server.hold_memory(self, self._sender.memory_bytes + receive_bytes)

    def _receive_granted(self) -> bool:
        """Whether the transport may read: True unless the next read needs the receive
        buffer to grow (a big WRITE's payload) by more than the budget gives."""
        core = self._core
        wanted = core.buffer_bytes_wanted - RECEIVE_BUFFER_BYTES
        now = max(0, core.buffer_bytes - RECEIVE_BUFFER_BYTES)
        if wanted <= now:
            if self._receive_granted_bytes:  # the big WRITE is served: its grant goes
                self._receive_granted_bytes = 0
                self._account_memory()
            return True
        if wanted <= self._receive_granted_bytes:
            return True
        self._account_memory(now)
        if self._server.budget.room(self) < wanted - now:
            return False
        self._receive_granted_bytes = wanted
        self._account_memory(wanted)
        return True

    def _hold_for_memory(self) -> None:
        """Stop reading and serving until the budget has room (memory_freed)."""
        assert self._transport is not None
        self._held = self._waiting_for_memory = True
        self._transport.pause_reading()
        self._server.budget.wait(self)

    def _on_reply_backlog(self, backlogged: bool) -> None:
        # A client that does not read its replies stops being read: memory stays bounded.
        if self._transport is None or self._transport.is_closing():
            return
        if backlogged:
            self._transport.pause_reading()
        elif self._held:  # not from inside the sender's pump: on the next loop turn
            asyncio.get_running_loop().call_soon(self._serve_held)
        else:
            self._transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._tls is not None:
            return self._tls_in
        return self._core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._received_bytes += nbytes
        self._arrived_ns = time.monotonic_ns()
        if self._closing or self._dropped:
            return  # closed by the server (e.g. set_read_only): no request runs any more
        if self._tls is not None:
            self._tls_received(self._tls, nbytes)
            return
        self._core.buffer_updated(nbytes)
        self._serve_buffered()
        self._hold_unless_receive_granted()

    def _hold_unless_receive_granted(self) -> None:
        if not (self._held or self._closing or self._dropped) and not self._receive_granted():
            self._hold_for_memory()

    def _tls_received(self, tls: TlsPipe, nbytes: int) -> None:
        assert self._sender is not None
        was_established = tls.established
        try:
            tls.feed(self._tls_in[:nbytes])
        except ssl.SSLError as exc:
            self._tls_failed(exc, "TLS failed" if was_established else "TLS handshake failed")
            return
        if tls.established and not was_established:
            self._core.tls_established()
            self._log_tls(tls)
        self._sender.send([])  # handshake records
        self._serve_tls(tls)

    def _serve_tls(self, tls: TlsPipe) -> None:
        """Like a recv into the core's buffer: decrypt as much as the room it offers, then
        serve, until the pipe holds no plaintext or the connection is held (what is left
        waits in the pipe, at most one receive's worth: reading is paused). Each read
        into the core may grow its buffer: the budget is asked first."""
        core = self._core
        self._hold_unless_receive_granted()
        try:
            while not (self._held or self._closing or self._dropped) and (
                n := tls.read_into(core.get_buffer(-1))
            ):
                core.buffer_updated(n)
                self._serve_buffered()
                self._hold_unless_receive_granted()
        except ssl.SSLError as exc:  # a damaged record
            self._tls_failed(exc, "TLS failed")

    def _tls_failed(self, exc: ssl.SSLError, what: str) -> None:
        assert self._sender is not None and self._transport is not None
        self._server.log_drop(
            self.peer, f"{what}: {handshake_failure_cause(exc)} ({exc}); dropping it"
        )
        self._dropped = True
        self._sender.send([])  # the alert, if any
        self._transport.close()

    def _log_tls(self, tls: TlsPipe) -> None:
        name = tls.peer_name()
        who = "no client certificate" if name == "?" else f"certificate of {name}"
        log.info("client %s: %s, %s", self.peer, tls.version(), who)

    def _start_tls(self) -> None:
        """The core queued the ACK to NBD_OPT_STARTTLS: send it, then speak TLS only."""
        assert self._sender is not None
        context = self._server.tls_context
        assert context is not None, "StartTls without a TLS context"
        self._flush_out()
        self._tls = TlsPipe(context)
        self._tls_in = memoryview(bytearray(TLS_RECEIVE_BYTES))
        self._sender.start_tls(self._tls)

    def _tls_required(self, event: TlsRequired) -> None:
        if self._told_tls_required:
            return
        self._told_tls_required = True
        name = c.Opt(event.option).name if event.option in _OPTS else str(event.option)
        self._server.refused(
            self.peer,
            f"NBD_OPT_{name} without TLS: TLS is required (nbd.tls.mode: require) and the "
            "client has not sent NBD_OPT_STARTTLS",
        )

    def _serve_buffered(self) -> None:
        """Run the requests in the receive buffer; stop early, leaving the rest there, when
        the replies made reach the backlog limit (a burst of reads nobody reads back)."""
        core = self._core
        batch: list[Request] = []
        owed = 0  # bytes of READ replies made since the sender last saw them
        chunk = min(REPLY_CHUNK_BYTES, self._server.budget.room(self))
        try:
            while True:
                event = core.next_event()
                if isinstance(event, Request):
                    batch.append(event)
                    if event.cmd is _READ:
                        owed += event.length
                    if len(batch) < JOURNAL_BATCH_REQUESTS and owed < chunk:
                        continue
                    self._run_batch(batch)
                    batch = []
                    if self._held_for_syncs():
                        break
                    if owed >= chunk:
                        owed = 0
                        if self._backlogged_after_flush():
                            return
                        chunk = min(REPLY_CHUNK_BYTES, self._server.budget.room(self))
                        if chunk <= 0:
                            self._hold_for_memory()
                            return
                    continue
                if batch:
                    self._run_batch(batch)
                    batch = []
                    if self._held_for_syncs():
                        break
                if event is NEED_DATA:
                    break
                if isinstance(event, ExportChosen):
                    self._export = self._server.exports[event.export.name]
                    if self._sender is not None:
                        self._sender.volume = self._export.volume
                    log.debug("client %s uses export %s", self.peer, event.export.name)
                elif isinstance(event, RequestRefused):
                    log.debug("client %s: refused: %s", self.peer, event.why)
                elif isinstance(event, StartTls):
                    self._start_tls()
                elif isinstance(event, TlsRequired):
                    self._tls_required(event)
                elif isinstance(event, Disconnect):
                    self._flush_out()
                    self.close()
                    return
        except RemoteProtocolError as exc:
            self._server.log_drop(self.peer, f"broke the protocol: {exc}; dropping it")
            self._dropped = True
            self._flush_out()
            assert self._transport is not None
            self._transport.close()  # no waiting for a peer that broke the rules
            return
        self._flush_out()

    def _backlogged_after_flush(self) -> bool:
        """Hand the replies made so far to the sender; True (and the connection is held:
        reading paused, the rest of the requests left buffered) if that filled the backlog."""
        self._flush_out()
        if self._sender is None or not self._sender.backlogged:
            return False
        self._held = True
        assert self._transport is not None
        self._transport.pause_reading()  # the sender's callback did too; made plain here
        return True

    def _serve_held(self) -> None:
        """The backlog drained: run the requests left buffered, then read again."""
        transport = self._transport
        if not self._held or self._closing or transport is None or transport.is_closing():
            return
        if self._waiting_for_memory:
            self._account_memory()
            if self._server.budget.room(self) <= 0:
                self._server.budget.wait(self)  # still none: the next release wakes it again
                return
        self._held = self._waiting_for_memory = False
        self._serve_buffered()
        if self._tls is not None:
            self._serve_tls(self._tls)  # the plaintext left in the pipe
        if self._held or self._closing or self._dropped or transport.is_closing():
            return
        self._hold_unless_receive_granted()
        if self._held:
            return
        if self._sender is None or not self._sender.backlogged:
            transport.resume_reading()

    def _flush_out(self) -> None:
        if self._sender is not None:
            self._sender.send(self._core.data_to_send())
            self._account_memory()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._pending.add(task)
        self._server.pending.add(task)
        task.add_done_callback(self._task_done)
        task.add_done_callback(self._server.pending.discard)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._close_if_done()

    def _run_batch(self, batch: list[Request]) -> None:
        """Journal the batch's writes, put the records in the journal file, then do the I/O:
        a record is on file before its data can be on the volume (see WriteJournal)."""
        export = self._export
        assert export is not None
        journal = export.journal
        delay_s = 0.0
        if journal is not None:
            for req in batch:
                if req.cmd in _JOURNALED and not self._refused_fast_zero(export.volume, req):
                    self._journal(journal, export.volume.name, req)
            journal.flush_records()
            delay_s = journal.ack_delay_s
        if export.stats is None:
            for req in batch:
                self._request(req, delay_s)
            return
        answered = [req for req in batch if self._request(req, delay_s)]  # replied to now
        export.stats.answered(answered, time.monotonic_ns() - self._arrived_ns)

    def _reply_later(self, req: Request, delay_s: float) -> None:
        """Inflow control: the write is done and journaled; its reply waits ``delay_s``."""
        loop = asyncio.get_running_loop()
        self._delayed.append((loop.time() + delay_s, req._replace(payload=b"")))
        if self._delay_task is None:
            self._delay_task = loop.create_task(self._send_delayed())
            self._track(self._delay_task)

    async def _send_delayed(self) -> None:
        """Send each held reply when it is due, in order; one task per connection."""
        loop = asyncio.get_running_loop()
        try:
            while self._delayed:
                due, _ = self._delayed[0]
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                now = loop.time()
                while self._delayed and self._delayed[0][0] <= now:
                    self._core.reply_ok(self._delayed.popleft()[1])
                self._flush_out()
        finally:
            self._delay_task = None

    @staticmethod
    def _journal(journal: WriteJournal, volume: str, req: Request) -> None:
        cmd = req.cmd
        if cmd is _WRITE:
            journal.wrote(volume, req.offset, req.payload)
        elif cmd is _TRIM:
            journal.trimmed(volume, req.offset, req.length)
        else:
            journal.zeroed(volume, req.offset, req.length)

    @staticmethod
    def _refused_fast_zero(volume: Volume, req: Request) -> bool:
        if req.cmd is not _WRITE_ZEROES or not req.flags & c.CMD_FLAG_FAST_ZERO:
            return False
        return not volume.zero_is_fast(allocate=bool(req.flags & c.CMD_FLAG_NO_HOLE))

    def _request(self, req: Request, delay_s: float = 0.0) -> bool:
        """Run one request; True when it is answered now (or, with ``delay_s``, inflow
        control, held that much before its reply goes: a journaled write without FUA that
        succeeded), False when its reply waits for an fdatasync (FLUSH, FUA:
        _reply_after_sync answers it)."""
        export = self._export
        assert export is not None
        volume = export.volume
        cmd = req.cmd
        try:
            if cmd is _READ:
                self._read(volume, req)
                return True
            if cmd is _WRITE:
                volume.write(req.offset, req.payload)
            elif cmd is _TRIM:
                volume.punch(req.offset, req.length)
            elif cmd is _WRITE_ZEROES:
                if self._refused_fast_zero(volume, req):
                    self._core.reply_error(req, c.ENOTSUP, "cannot zero fast")
                    return True
                volume.zero(req.offset, req.length, allocate=bool(req.flags & c.CMD_FLAG_NO_HOLE))
            elif req.cmd == c.Cmd.CACHE:
                volume.advise_willneed(req.offset, req.length)
            elif req.cmd == c.Cmd.BLOCK_STATUS:
                extents = volume.extents(req.offset, req.length, max_extents=256)
                flags = c.STATE_HOLE | c.STATE_ZERO
                self._core.reply_block_status(
                    req, [(e.length, flags if e.hole else 0) for e in extents]
                )
                return True
        except OSError as exc:
            if export.journal is not None and req.cmd in _JOURNALED:
                export.journal.failed(volume.name, req.offset, req.length)
            self._server.io_error(
                volume.name, f"{req.cmd.name} failed at {req.offset}+{req.length}: {exc}"
            )
            self._core.reply_error(req, c.ENOSPC if exc.errno == 28 else c.EIO, str(exc))
            return True
        if cmd is _FLUSH or req.flags & _FUA:
            self._reply_after_sync(export, req)
            return False
        if delay_s > 0 and cmd in _JOURNALED and len(self._delayed) < DELAYED_REPLIES_MAX:
            self._reply_later(req, delay_s)  # the payload is dropped: it is the receive buffer
            return True
        self._core.reply_ok(req)
        return True

    def _read(self, volume: Volume, req: Request) -> None:
        # Small reads skip hole detection: two lseeks would cost more than sending zeros.
        if (
            req.length < _HOLE_CHUNK_MIN_BYTES
            or not self._core.structured
            or req.flags & c.CMD_FLAG_DF
        ):
            self._core.reply_read(req, [(req.offset, self._data(volume, req.offset, req.length))])
            return
        pieces: list[tuple[int, Piece]] = []
        for e in volume.extents(req.offset, req.length, max_extents=64):
            pieces.append(
                (e.offset, e.length if e.hole else self._data(volume, e.offset, e.length))
            )
        covered = pieces[-1][0] + _piece_len(pieces[-1][1])
        end = req.offset + req.length
        if covered < end:
            pieces.append((covered, self._data(volume, covered, end - covered)))
        self._core.reply_read(req, pieces)

    @staticmethod
    def _data(volume: Volume, offset: int, length: int) -> bytes | FileData:
        if length >= _SENDFILE_MIN_BYTES:
            return FileData(offset, length)
        return volume.read(offset, length)

    def _reply_after_sync(self, export: Export, req: Request) -> None:
        """FLUSH, or a FUA write done: answered once a sync that started after it is done."""
        # No view of the receive buffer is kept.
        self._sync_waiting.append((req._replace(payload=b""), self._arrived_ns))
        if self._sync_rounds is None:
            self._sync_rounds = asyncio.get_running_loop().create_task(self._run_syncs(export))
            self._track(self._sync_rounds)

    def _held_for_syncs(self) -> bool:
        """Too many requests wait for a sync: stop reading and serving (the rest stays in the
        receive buffer) until a round answers them."""
        if len(self._sync_waiting) < SYNC_WAITERS_MAX:
            return False
        assert self._transport is not None
        self._held = self._waiting_for_sync = True
        self._transport.pause_reading()
        return True

    async def _run_syncs(self, export: Export) -> None:
        """Sync rounds (group commit): each answers the requests that came before it
        started; those that come meanwhile wait for the next. One task per connection,
        whatever the client sends."""
        try:
            while self._sync_waiting:
                answering, self._sync_waiting = self._sync_waiting, []
                try:
                    if export.journal is None:
                        await export.syncer.sync()
                    else:
                        await asyncio.gather(export.syncer.sync(), export.journal.sync())
                except OSError as exc:
                    self._server.io_error(export.volume.name, f"fdatasync failed: {exc}")
                    for req, _ in answering:
                        self._core.reply_error(req, c.EIO, f"fdatasync: {exc}")
                else:
                    for req, _ in answering:
                        self._core.reply_ok(req)
                if export.stats is not None:
                    now_ns = time.monotonic_ns()
                    for req, arrived_ns in answering:
                        export.stats.answered((req,), now_ns - arrived_ns)
                self._flush_out()
                if self._waiting_for_sync:
                    self._waiting_for_sync = False
                    self._serve_held()
        finally:
            self._sync_rounds = None


def _piece_len(piece: Piece) -> int:
    if isinstance(piece, int):
        return piece
    return piece.length if isinstance(piece, FileData) else len(piece)


class NbdServer:
    """Serves a set of exports on one TCP address."""

    def __init__(
        self,
        volumes: Mapping[str, Volume],
        journal: WriteJournal | None = None,
        *,
        read_only: bool = False,
        always_read_only: Collection[str] = (),
        limits: NbdConfig | None = None,
        tls_context: ssl.SSLContext | None = None,
        tls_mode: TlsMode = TlsMode.OFF,
        count_requests: bool = False,
    ) -> None:
        """``always_read_only``: names of the volumes hosts may never write (config
        volumes[].read_only), whatever set_writable says later. ``tls_context`` goes with
        TlsMode.REQUIRE or OPTIONAL (common.nbd.tls loads both from nbd.tls). With
        ``count_requests`` (metrics on) each export keeps HostIoStats."""
        if (tls_context is None) != (tls_mode is TlsMode.OFF):
            raise ValueError("a TLS context goes with TlsMode.REQUIRE or OPTIONAL, and only")
        self.exports = {
            name: Export(
                v,
                journal,
                read_only,
                always_read_only=name in always_read_only,
                stats=HostIoStats() if count_requests else None,
            )
            for name, v in volumes.items()
        }
        self.limits = limits or NbdConfig()
        self.tls_context = tls_context
        self.tls_mode = tls_mode
        self.connections: set[NbdConnection] = set()
        self.budget = MemoryBudget(self.limits.memory_limit, self.limits.max_connections)
        self.pending: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._watch_timer: asyncio.TimerHandle | None = None
        self._refusals = LogLimiter()
        self._drops = LogLimiter()
        self._io_errors = LogLimiter()  # a failing disk fails every request: not a line each

    def hold_memory(self, conn: NbdConnection, nbytes: int) -> None:
        """``conn`` holds ``nbytes`` now; wake the connections waiting if that freed some."""
        for waiter in self.budget.hold(conn, nbytes):
            cast(NbdConnection, waiter).memory_freed()

    def memory_released(self, conn: NbdConnection) -> None:
        """``conn`` is gone: what it held is free."""
        for waiter in self.budget.forget(conn):
            cast(NbdConnection, waiter).memory_freed()

    def refused(self, peer: str, why: str) -> None:
        if self._refusals.allow(asyncio.get_running_loop().time()):
            log.warning("client %s refused: %s", peer, why)

    def io_error(self, volume: str, what: str) -> None:
        """A host request failed on the volume (the client got EIO/ENOSPC); limited."""
        if self._io_errors.allow(asyncio.get_running_loop().time()):
            log.error("export %s: %s", volume, what, extra={"volume": volume})

    def log_drop(self, peer: str, why: str, level: int = logging.WARNING) -> None:
        """One line per client dropped, or gone, before it was any use; limited (a flood)."""
        if self._drops.allow(asyncio.get_running_loop().time()):
            log.log(level, "client %s %s", peer, why)

    def _watch(self) -> None:
        """Drop the clients past a deadline; log what the limiters held back."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            why = conn.overdue(now)
            if why is not None:
                self.log_drop(conn.peer, f"{why}; dropping it")
                conn.drop()
        for limiter, what in ((self._refusals, "refused"), (self._drops, "dropped")):
            count = limiter.summary(now)
            if count:
                log.warning(
                    "%d more clients %s in the last %.0f s (not logged one by one)",
                    count,
                    what,
                    limiter.interval_s,
                )
        count = self._io_errors.summary(now)
        if count:
            log.error(
                "%d more host requests failed on the volumes in the last %.0f s "
                "(not logged one by one)",
                count,
                self._io_errors.interval_s,
            )
        self._watch_timer = loop.call_later(self._tick_s(), self._watch)

    def _tick_s(self) -> float:
        shortest = min(self.limits.handshake_timeout_s, self.limits.stall_timeout_s)
        return max(0.05, min(WATCH_TICK_MAX_S, shortest / 4))

    def set_writable(self, journal: WriteJournal) -> None:
        """Hosts may write from now on (takeover): new connections see a writable export,
        existing ones keep what they negotiated (NBD flags are fixed per connection). A
        volume configured read-only stays so."""
        for export in self.exports.values():
            export.journal = journal
            export.info = dataclasses.replace(export.info, read_only=export.host_read_only)

    def set_read_only(self) -> None:
        """Hosts may no longer write (an S-VOL leaving SSWS). A connection keeps the flags it
        negotiated, so every connection is closed (after answering what it has in flight);
        clients reconnect to a read-only export. Writes run on the loop inside a request
        batch, so none reaches a volume after this returns."""
        for export in self.exports.values():
            export.journal = None
            export.info = dataclasses.replace(export.info, read_only=True)
        for conn in list(self.connections):
            conn.close()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: NbdConnection(self), host, port)
        self._watch_timer = loop.call_later(self._tick_s(), self._watch)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        """Stop listening, answer what is in flight, close every connection."""
        if self._server is not None:
            self._server.close()
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        for conn in list(self.connections):
            conn.close()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + STOP_DRAIN_S
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # replies still draining to slow clients
        for conn in list(self.connections):
            log.warning(
                "client %s did not read its replies in %.0f s; dropping it", conn.peer, STOP_DRAIN_S
            )
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
