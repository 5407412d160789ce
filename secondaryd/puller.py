"""The pull loop: connect to the primary, say Hello, then READ_JOURNAL until the link drops.

    connect ─► Hello(group, generation, restored, applied, volumes, state, svol_written,
                     failure: why this site can no longer store or apply what it pulls)
            ◄─ Welcome(generation, start_seq, state) ─► sink.welcomed(): same generation
               goes on from restored+1; another one resets the restore journal to start_seq
            ◄─ Refuse(code, reason) ─► logged, shown in display, retried with backoff
            ◄─ Swapped ─► sink.peer_swapped(): that site a swap made the secondary; the
               swap this site asked for is finished here
            ─► ReportBitmap per volume ◄─ BitmapTaken ─► sink.bitmap_taken(): cleared here
    loop:   ─► SwapRequest, when the group asked for one ◄─ SwapAnswer | Refuse ─► its future
    loop:   ─► ReadJournal(from, limits, restored, applied)
            ◄─ JournalBatch ─► the next ReadJournal goes out at once (when this batch held
                               records and no swap step waits), then sink.received():
                               restore journal append + fdatasync, then `restored` moves
                               on (and rides on a later request)
Every read that brings bytes calls sink.heard() (the path watch): an answer of many MiB
crossing a slow link is contact, only silence is not. The primary hears nothing while an
answer crosses, so AnswerSizer keeps each one within a quarter of path_watch_s at the rate
the last full answer came in (1 MiB first, up to 16 MiB).
A lost link is retried with a bounded exponential backoff; the state stays what it was.
With link.secret_file, connect is followed by the challenge-response (replication.auth)
before Hello; with link.tls the connection is TLS and presents this site's certificate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from common.config import Address
from common.linksecurity import LinkSecurity
from common.replication.auth import CHALLENGE_BYTES, PROOF_BYTES, AuthFailed, ClientHandshake
from common.replication.auth import MAGIC as AUTH_MAGIC
from common.replication.linkstats import LinkStats
from common.replication.messages import (
    PROTOCOL_VERSION,
    BitmapTaken,
    Hello,
    JournalBatch,
    Message,
    ReadJournal,
    Refuse,
    ReportBitmap,
    SwapAnswer,
    Swapped,
    SwapRequest,
    VolumeDesc,
    Welcome,
)
from common.replication.protocol import (
    ConnectionClosed,
    NeedData,
    RemoteProtocolError,
    ReplicationConnection,
    Side,
)

log = logging.getLogger("journalpair.pull")

BATCH_ENTRIES_MAX = 16384
BATCH_BYTES_MAX = 16 << 20
BATCH_BYTES_MIN = 256 << 10
BATCH_BYTES_FIRST = 1 << 20  # until an answer has shown what the link carries
BATCH_GROWTH_MAX = 4  # an answer may ask for at most this many times the last limit
# An answer should cross the link in this share of path_watch_s: while it crosses, the
# primary hears no request (bytes in the buffers along the way leave its queue long before
# they arrive), and a slow but working link must not look silent.
ANSWER_SHARE_OF_PATH_WATCH = 0.25
LONG_POLL_MS = 1000
# Short: the primary learns `applied` from requests only (COPY -> PAIR, lag), and a
# request sent ahead of storing a batch carries the position before it.
DESTAGING_POLL_MS = 10
RECV_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 30.0  # a long poll is at most a few seconds; silence beyond this is a dead link
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
# Right after a swap the new primary's path watch runs from its start: its secondary must
# not sleep through it.
BACKOFF_MAX_AFTER_SWAP_S = 0.5
AUTH_TIMEOUT_S = 5.0  # for the primary's challenge and proof
QUICK_RETRY_EVERY_S = 1.0  # at most one reconnect without a backoff per this many seconds


class PullSink(Protocol):
    group: str
    volumes: tuple[VolumeDesc, ...]
    storage_failure: str  # "" or why the restore journal / S-VOL disk failed (for Hello)
    path_watch_s: float  # pair.path_watch_s: an answer must cross the link well within it
    link_stats: LinkStats  # bytes each way and link-ups, counted here (metrics)

    def position(self) -> tuple[str, int, int]:
        """(generation, restored_seq, applied_seq)"""

    def hello_state(self) -> tuple[str, bool]:
        """(this site's pair state, hosts wrote the S-VOLs while SSWS)"""

    def waits_for_new_primary(self) -> bool:
        """A swap made this site the secondary, and the new primary is starting."""

    async def welcomed(self, welcome: Welcome) -> int:
        """Returns the seq to pull from."""

    def bitmap_reports(self, welcome: Welcome) -> list[ReportBitmap]:
        """What to hand over to the primary after Welcome (nothing while writable)."""

    def bitmap_taken(self, report: ReportBitmap) -> None: ...

    def peer_swapped(self, swapped: Swapped) -> str:
        """The primary's site is the secondary since a swap step this site asked for (its
        answer was lost); returns what the link shows."""

    def next_request(self) -> tuple[SwapRequest, asyncio.Future[SwapAnswer]] | None:
        """A swap step to ask the primary before the next ReadJournal, and where its answer
        goes (a Refuse, or a dropped link, becomes the future's exception)."""

    async def received(self, batch: JournalBatch) -> None: ...
    def link(self, up: bool, why: str) -> None: ...

    def heard(self) -> None:
        """Bytes came from the primary: the link works, even while one long answer is still
        crossing a slow link (the path watch counts only silence)."""


class LinkDown(Exception):
    pass


class AnswerSizer:
    """How many bytes a ReadJournal asks for: what the link carried per second in the last
    full answer (first to last byte), times answer_s, within BATCH_BYTES_MIN..MAX. Short
    answers (the journal held little) say nothing about the link and change nothing."""

    def __init__(self, answer_s: float) -> None:
        self.answer_s = answer_s
        self.max_bytes = BATCH_BYTES_FIRST

    def measured(self, nbytes: int, seconds: float | None) -> None:
        """``seconds`` from the answer's first bytes to its last; None: it was read at once
        from what had come in meanwhile, which tells nothing of the link's rate."""
        if seconds is None or nbytes < self.max_bytes // 2:
            return
        fits = nbytes * self.answer_s / seconds if seconds > 0 else BATCH_BYTES_MAX
        ceiling = min(BATCH_BYTES_MAX, self.max_bytes * BATCH_GROWTH_MAX)
        self.max_bytes = int(max(BATCH_BYTES_MIN, min(ceiling, fits)))


class _Timed:
    """When the bytes of the message being read began to arrive (monotonic seconds)."""

    def __init__(self) -> None:
        self.first_bytes_at: float | None = None

    def seconds(self) -> float | None:
        return None if self.first_bytes_at is None else time.monotonic() - self.first_bytes_at


async def pull_forever(primary: Address, sink: PullSink, security: LinkSecurity) -> None:
    backoff = BACKOFF_MIN_S
    quick_retry_at = -QUICK_RETRY_EVERY_S
    while True:
        pulled: list[bool] = []
        try:
            await _pull_once(primary, sink, pulled, security)
        except (OSError, LinkDown, RemoteProtocolError, TimeoutError) as exc:
            sink.link(False, _why(exc))
        except Exception as exc:  # a bad batch, a full restore journal...: not the daemon's end
            log.exception("pulling failed; the link is dropped and retried")
            sink.link(False, f"pulling failed: {type(exc).__name__}: {exc}")
        if pulled:  # the link worked: a drop (a new generation, a restart) retries soon
            backoff = BACKOFF_MIN_S
            now = time.monotonic()
            if now - quick_retry_at >= QUICK_RETRY_EVERY_S:
                quick_retry_at = now  # a create or resync closes the link: Hello again now
                continue
        await asyncio.sleep(backoff)
        ceiling = BACKOFF_MAX_AFTER_SWAP_S if sink.waits_for_new_primary() else BACKOFF_MAX_S
        backoff = min(backoff * 2, ceiling)


async def _pull_once(
    primary: Address, sink: PullSink, pulled: list[bool], security: LinkSecurity
) -> None:
    """One link, until it drops. `pulled` gets an entry at the first batch: a link that
    is refused right after Welcome (needs_copy, say) did not work, and backs off."""
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
    # arrives as the read completes, and the daemon then never stops.
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(
            primary.host, primary.port, ssl=security.client_tls
        )
    core = ReplicationConnection(Side.SECONDARY)
    try:
        if security.secret is not None:
            await _authenticate(
                reader, writer, security.secret, security.client_tls is not None, sink.link_stats
            )
        generation, restored, applied = sink.position()
        state, written = sink.hello_state()
        hello = Hello(
            PROTOCOL_VERSION,
            sink.group,
            generation,
            restored,
            applied,
            sink.volumes,
            state,
            written,
            sink.storage_failure,
        )
        _send(writer, sink.link_stats, core.send(hello))
        if security.secret is None:
            await _first_answer(core, reader, sink.link_stats)
        try:
            answer = await _next_message(core, reader, sink)
        except LinkDown:
            hint = (
                "does its link.tls.ca trust this site's certificate?"
                if security.client_tls is not None
                else "does it require link.tls?"
            )
            raise LinkDown(f"the primary closed the link before answering Hello ({hint})") from None
        if isinstance(answer, Refuse):
            raise LinkDown(f"primary refused ({answer.code}): {answer.reason}")
        if isinstance(answer, Swapped):
            raise LinkDown(sink.peer_swapped(answer))
        assert isinstance(answer, Welcome)
        from_seq = await sink.welcomed(answer)
        for report in sink.bitmap_reports(answer):
            _send(writer, sink.link_stats, core.send(report))
            answer = await _next_message(core, reader, sink)
            if isinstance(answer, Refuse):
                raise LinkDown(f"primary refused ({answer.code}): {answer.reason}")
            assert isinstance(answer, BitmapTaken)
            sink.bitmap_taken(report)
        sink.link_stats.came_up()
        sink.link(True, f"connected to {primary.host}:{primary.port}")
        sizer = AnswerSizer(sink.path_watch_s * ANSWER_SHARE_OF_PATH_WATCH)
        timed = _Timed()
        asked_ahead = False  # the next ReadJournal went out before the last batch was stored
        while True:
            if not asked_ahead:
                asked = sink.next_request()
                if asked is not None:
                    await _ask(core, reader, writer, sink, *asked)
                _ask_journal(core, writer, sink, from_seq, sizer.max_bytes)
            answer = await _next_message(core, reader, sink, timed)
            asked_ahead = False
            if isinstance(answer, Refuse):
                raise LinkDown(f"primary refused ({answer.code}): {answer.reason}")
            assert isinstance(answer, JournalBatch)
            if not pulled:
                pulled.append(True)
            sizer.measured(len(answer.records), timed.seconds())
            from_seq += answer.count
            if answer.count and sink.next_request() is None:
                # Ask for the next batch before storing this one: the primary reads and
                # sends it while this side writes, instead of each waiting for the other.
                _ask_journal(core, writer, sink, from_seq, sizer.max_bytes)
                asked_ahead = True
            await sink.received(answer)
    finally:
        writer.close()


def _ask_journal(
    core: ReplicationConnection,
    writer: asyncio.StreamWriter,
    sink: PullSink,
    from_seq: int,
    max_bytes: int,
) -> None:
    _generation, restored, applied = sink.position()
    # While the destager works, ask again soon: the primary learns `applied` only from
    # requests (lag, COPY -> PAIR); when caught up, a long poll costs nothing.
    wait_ms = LONG_POLL_MS if applied >= from_seq - 1 else DESTAGING_POLL_MS
    request = ReadJournal(
        from_seq,
        BATCH_ENTRIES_MAX,
        max_bytes,
        wait_ms,
        restored,
        applied,
        sink.hello_state()[1],
    )
    _send(writer, sink.link_stats, core.send(request))


def _send(writer: asyncio.StreamWriter, stats: LinkStats, data: bytes) -> None:
    stats.sent_bytes += len(data)
    writer.write(data)


async def _authenticate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    tls: bool,
    stats: LinkStats,
) -> None:
    """Prove this site holds the secret, and make the primary prove it (auth.py)."""
    handshake = ClientHandshake(secret)
    try:
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            challenge = await reader.readexactly(CHALLENGE_BYTES)
            stats.received_bytes += len(challenge)
            _send(writer, stats, handshake.respond(challenge))
            proof = await reader.readexactly(PROOF_BYTES)
            stats.received_bytes += len(proof)
        handshake.check_proof(proof)
    except TimeoutError:
        raise LinkDown(
            "authentication failed: no challenge from the primary (is link.secret_file set there?)"
        ) from None
    except asyncio.IncompleteReadError:
        suspects = "wrong shared secret"
        if tls:
            suspects += ", or a certificate it does not trust"
        raise LinkDown(
            f"authentication failed: the primary closed the link ({suspects}?)"
        ) from None
    except AuthFailed as exc:
        raise LinkDown(f"authentication failed: {exc}") from None


async def _first_answer(
    core: ReplicationConnection, reader: asyncio.StreamReader, stats: LinkStats
) -> None:
    """A primary that requires a secret this site lacks answers Hello with a challenge:
    say that, rather than "broke the protocol"."""
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        data = await reader.read(RECV_BYTES)
    stats.received_bytes += len(data)
    if data.startswith(AUTH_MAGIC):
        raise LinkDown("the primary requires authentication: set link.secret_file on this site too")
    core.receive_data(data)


class SwapRefused(Exception):
    """The primary refused a swap step: str() is its reason."""


class SwapLinkDropped(SwapRefused):
    """The link dropped before the answer to a swap step came: it may have been taken."""


async def _ask(
    core: ReplicationConnection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    sink: PullSink,
    request: SwapRequest,
    answered: asyncio.Future[SwapAnswer],
) -> None:
    log.info("asking the primary: swap step %s", request.kind.value)
    try:
        _send(writer, sink.link_stats, core.send(request))
        answer = await _next_message(core, reader, sink)
    except BaseException as exc:
        if not answered.done():
            answered.set_exception(SwapLinkDropped(f"the link dropped: {_why(exc)}"))
        raise
    if isinstance(answer, Refuse):
        answered.set_exception(SwapRefused(answer.reason))
        raise LinkDown(f"primary refused ({answer.code}): {answer.reason}")
    assert isinstance(answer, SwapAnswer)
    answered.set_result(answer)


async def _next_message(
    core: ReplicationConnection,
    reader: asyncio.StreamReader,
    sink: PullSink,
    timed: _Timed | None = None,
) -> Message:
    started = False
    while True:
        event = core.next_event()
        if isinstance(event, ConnectionClosed):
            raise LinkDown("the primary closed the link")
        if not isinstance(event, NeedData):
            if timed is not None and not started:
                timed.first_bytes_at = None  # it was read along with the last one
            return event
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            data = await reader.read(RECV_BYTES)
        if data:
            sink.link_stats.received_bytes += len(data)
            sink.heard()
            if timed is not None and not started:
                started, timed.first_bytes_at = True, time.monotonic()
        core.receive_data(data)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "primary did not answer in time"
    if isinstance(exc, RemoteProtocolError):
        return f"primary broke the protocol: {exc}"
    return str(exc) or type(exc).__name__
