"""The primary end of the replication link: a thin asyncio adapter over the replication core.

    secondary ── Hello ──────────► group.welcome()       ──► Welcome | Refuse | Swapped
              ── ReadJournal ────► group.read_journal()  ──► JournalBatch (now, or after a
                                                             bounded long poll) | Refuse
              ── ReportBitmap ───► group.report_bitmap() ──► BitmapTaken | Refuse
              ── SwapRequest ────► group.swap()          ──► SwapAnswer | Refuse
(secondaryd.swapped answers Hello only, on a site a swap made the secondary.)
One request is outstanding at a time (the core enforces it), so one task per connection
answers it. Bytes received, and an answer's bytes leaving the send queue (drained()), are
contact for the path watch: one answer of up to 16 MiB takes seconds on a slow link.
A peer that breaks the protocol is logged and dropped; others carry on.

With `link.secret_file`, a connection starts with the challenge (common.replication.auth)
and nothing reaches the core before the peer proved it has the secret; with `link.tls`,
the listener is TLS and requires the peer's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import ssl
import sys
import termios
from collections.abc import Awaitable
from typing import Protocol, cast

from common.linksecurity import LinkSecurity
from common.replication.auth import AuthFailed, ServerHandshake
from common.replication.linkstats import LinkStats
from common.replication.messages import (
    BitmapTaken,
    Hello,
    JournalBatch,
    ReadJournal,
    Refuse,
    ReportBitmap,
    SwapAnswer,
    Swapped,
    SwapRequest,
    Welcome,
)
from common.replication.protocol import (
    NEED_DATA,
    ConnectionClosed,
    RemoteProtocolError,
    ReplicationConnection,
    Side,
    State,
)
from common.tlspipe import TlsPipe

log = logging.getLogger("journalpair.link")

TLS_HANDSHAKE_S = 10.0


class JournalSource(Protocol):
    def welcome(self, hello: Hello, peer: str) -> Welcome | Refuse | Swapped: ...
    async def read_journal(self, request: ReadJournal) -> JournalBatch | Refuse: ...
    def report_bitmap(self, report: ReportBitmap) -> BitmapTaken | Refuse: ...
    async def swap(self, request: SwapRequest) -> SwapAnswer | Refuse: ...
    def link_closed(self, peer: str) -> None: ...

    def heard(self) -> None:
        """Bytes came from the secondary (the path watch counts only silence)."""


class ServerConnection(asyncio.Protocol):
    def __init__(self, server: ReplicationServer) -> None:
        self._server = server
        self._core = ReplicationConnection(Side.PRIMARY)
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self._answering: asyncio.Task[None] | None = None
        self._welcomed = False
        secret = server.security.secret
        self._auth = None if secret is None else ServerHandshake(secret)
        tls = server.security.server_tls
        self._tls = None if tls is None else TlsPipe(tls)
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._unsent_seen = 0  # unsent_bytes() at the last drained() call

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._server.connections.add(self)
        log.info("secondary %s connected", self.peer, extra={"peer": self.peer})
        if self._tls is None:
            self._greet()
        else:  # the challenge waits for the TLS handshake, which the secondary starts
            self._handshake_timer = asyncio.get_running_loop().call_later(
                TLS_HANDSHAKE_S, self._handshake_too_slow
            )

    def _handshake_too_slow(self) -> None:
        log.warning("refused secondary %s: no TLS handshake in %.0f s", self.peer, TLS_HANDSHAKE_S)
        self.abort()

    def _greet(self) -> None:
        if self._auth is not None:
            self._write(self._auth.challenge())

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._server.stats.sent_bytes += len(data)
        self._transport.write(data if self._tls is None else self._tls.wrap(data))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._server.connections.discard(self)
        if self._answering is not None:
            self._answering.cancel()
        if self._welcomed:
            self._server.source.link_closed(self.peer)
        log.info(
            "secondary %s disconnected (%s)", self.peer, exc or "closed", extra={"peer": self.peer}
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def unsent_bytes(self) -> int:
        """Bytes written to the secondary and not yet taken by it: asyncio's buffer plus the
        kernel's send queue (which alone holds megabytes on a fast local socket)."""
        if self._transport is None:
            return 0
        unsent = self._transport.get_write_buffer_size()
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
                unsent += int.from_bytes(queued, sys.byteorder, signed=True)
        return unsent

    def drained(self) -> bool:
        """The secondary took bytes of an answer since the last call: a long answer crossing
        a slow link is contact, not silence."""
        unsent, seen = self.unsent_bytes(), self._unsent_seen
        self._unsent_seen = unsent
        return unsent < seen

    def data_received(self, data: bytes) -> None:
        self._server.source.heard()
        if self._tls is not None:
            data = self._decrypt(data)
            if not data:
                return
        self._server.stats.received_bytes += len(data)
        if self._auth is not None:
            data = self._authenticate(data)
            if not data:
                return
        try:
            self._core.receive_data(data)
            self._handle_events()
        except RemoteProtocolError as exc:
            log.warning("secondary %s broke the protocol: %s; dropping it", self.peer, exc)
            if self._core.state is State.ERROR:
                self._send(Refuse(exc.refuse_code, str(exc)[:1000]))
            self.close()

    def _decrypt(self, data: bytes) -> bytes:
        """Plaintext for the next layer; b"" during the handshake or after a failure."""
        assert self._tls is not None and self._transport is not None
        was_established = self._tls.established
        try:
            plain = self._tls.receive(data)
        except ssl.SSLError as exc:
            log.warning("refused secondary %s: TLS handshake failed: %s", self.peer, exc)
            self._transport.write(self._tls.to_send())  # the alert, if any
            self.close()
            return b""
        handshake = self._tls.to_send()
        if handshake:
            self._transport.write(handshake)
        if self._tls.established and not was_established:
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            log.info("secondary %s: TLS, certificate of %s", self.peer, self._tls.peer_name())
            self._greet()
        return plain

    def _authenticate(self, data: bytes) -> bytes:
        """Bytes for the core once the peer proved it holds the secret; b"" until then."""
        assert self._auth is not None
        try:
            proof = self._auth.receive(data)
        except AuthFailed as exc:
            log.warning("refused secondary %s: authentication failed: %s", self.peer, exc)
            self.close()
            return b""
        if proof is None:
            return b""
        self._write(proof)
        log.info("secondary %s authenticated", self.peer)
        leftover, self._auth = self._auth.leftover, None
        return leftover

    def eof_received(self) -> bool | None:
        self._core.receive_data(b"")
        return None

    def _handle_events(self) -> None:
        while True:
            event = self._core.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, Hello):
                answer = self._server.source.welcome(event, self.peer)
                self._welcomed = isinstance(answer, Welcome)
                if self._welcomed:
                    self._server.stats.came_up()
                self._send(answer)
                if isinstance(answer, Refuse):
                    log.warning("refused secondary %s: %s", self.peer, answer.reason)
                if not self._welcomed:
                    self.close()
            elif isinstance(event, ReadJournal):
                self._answer_later(self._server.source.read_journal(event))
            elif isinstance(event, SwapRequest):
                self._answer_later(self._server.source.swap(event))
            elif isinstance(event, ReportBitmap):
                taken = self._server.source.report_bitmap(event)
                self._send(taken)
                if isinstance(taken, Refuse):
                    log.warning("refused secondary %s: %s", self.peer, taken.reason)
                    self.close()

    def _answer_later(self, answering: Awaitable[JournalBatch | SwapAnswer | Refuse]) -> None:
        self._answering = asyncio.get_running_loop().create_task(self._answer(answering))

    async def _answer(self, answering: Awaitable[JournalBatch | SwapAnswer | Refuse]) -> None:
        answer = await answering
        if self._core.state is not State.WAITING:
            return  # the secondary went away meanwhile
        self._send(answer)
        if isinstance(answer, Refuse):
            log.warning("refused secondary %s: %s", self.peer, answer.reason)
            self.close()

    def _send(
        self, message: Welcome | Refuse | Swapped | JournalBatch | BitmapTaken | SwapAnswer
    ) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._write(self._core.send(message))


class ReplicationServer:
    def __init__(self, source: JournalSource, security: LinkSecurity) -> None:
        self.source = source
        self.security = security
        self.stats = LinkStats()  # every connection's bytes and link-ups, for the metrics
        self.connections: set[ServerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ServerConnection(self), host, port)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def drained(self) -> bool:
        """Some connection's answer moved on towards the secondary since the last call."""
        return any([conn.drained() for conn in self.connections])

    def drop_all(self, why: str) -> None:
        """Close every link, e.g. after create: the secondary says Hello again."""
        for conn in list(self.connections):
            log.info("closing the link to %s: %s", conn.peer, why)
            conn.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_all("stopping")
        if self._server is not None:
            await self._server.wait_closed()
