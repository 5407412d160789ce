"""The primary's master journal: every host write of the group, in order, with a seq.

    NBD WRITE/TRIM/WRITE_ZEROES ─► wrote()/trimmed()/zeroed() ─► then the volume write
                                     │ mode JOURNAL: encode, append, write to the segment file
                                     │               (page cache: survives a SIGKILL)
                                     │ mode BITMAP: mark the difference bitmap
                                     │ mode OFF (SMPL): nothing
    Records reach the file before their data reaches the volume, one request at a time, so
    after a SIGKILL only the LAST record can lack its volume write: check_tail() compares it
    with the volume at start and, if they differ, journals the region's real content again.
    FLUSH / FUA ─► sync(): group commit, fdatasync of the segments in an executor
    copier ─► append_base(): base-journal records, ordered with host writes by seq

A full journal never fails a host write: on_full() is called (the group suspends the pair,
PFUS) and the write is marked in the bitmap instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping

from common.bitmap import DifferenceBitmap
from common.journal.record import FLAG_BASE, Entry, Op, encode_record
from common.journal.store import JournalFull, JournalStore
from common.syncer import GroupSyncer
from common.volume import Volume

log = logging.getLogger("journalpair.journal")


REBASE_STEP_BYTES = 1 << 20


class Mode(enum.Enum):
    OFF = "off"  # SMPL: volumes are not replicated
    JOURNAL = "journal"  # COPY, PAIR, PFUL
    BITMAP = "bitmap"  # suspended: changes go to the difference bitmaps


class MasterJournal:
    def __init__(
        self,
        store: JournalStore,
        volumes: Mapping[str, Volume],
        bitmaps: Mapping[str, DifferenceBitmap],
        on_full: Callable[[], None],
    ) -> None:
        self.store = store
        self.volumes = volumes
        self.bitmaps = bitmaps
        self.mode = Mode.OFF
        self._on_full = on_full
        self._syncer = GroupSyncer(prepare=self._prepare_sync)
        self._appended: asyncio.Future[None] | None = None
        self.records_appended = 0

    # -- the NBD WriteJournal hooks ----------------------------------------------------

    def wrote(self, volume: str, offset: int, payload: bytes | memoryview) -> None:
        self._record(volume, Op.WRITE, offset, len(payload), payload)

    def trimmed(self, volume: str, offset: int, length: int) -> None:
        self._record(volume, Op.TRIM, offset, length, b"")

    def zeroed(self, volume: str, offset: int, length: int) -> None:
        self._record(volume, Op.ZERO, offset, length, b"")

    def failed(self, volume: str, offset: int, length: int) -> None:
        self._rebase(volume, offset, length, "the volume write failed")

    def before_replies(self) -> None:
        if self.store.pending_bytes:
            self.store.write_pending()

    def check_tail(self) -> bool:
        """At start: does the volume hold what the last record says? If not (killed between
        the record and its volume write), journal the region's actual content after it."""
        store = self.store
        if self.mode is not Mode.JOURNAL or store.last_seq < store.first_seq:
            return True
        entry = store.entries(store.last_seq, 1, 64 << 20)[0]
        if _volume_holds(self.volumes[entry.volume], entry):
            return True
        self._rebase(entry.volume, entry.offset, entry.length, f"seq {entry.seq} never reached it")
        self.before_replies()
        return False

    async def sync(self) -> None:
        await self._syncer.sync()

    # -- base journal (initial copy, resync) -----------------------------------------

    def append_base(self, volume: str, offset: int, payload: bytes) -> bool:
        """False when the journal is full (the pair has been suspended)."""
        return self._append(volume, Op.WRITE, offset, len(payload), payload, FLAG_BASE)

    def append_base_hole(self, volume: str, offset: int, length: int) -> bool:
        return self._append(volume, Op.TRIM, offset, length, b"", FLAG_BASE)

    # -- waiting for records (the read-journal long poll) --------------------------------

    async def wait_for_records(self, after_seq: int, timeout_s: float) -> None:
        """Return when a record after `after_seq` exists, or after timeout_s."""
        if self.store.last_seq > after_seq:
            return
        if self._appended is None or self._appended.done():
            self._appended = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: see secondaryd/puller.py
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._appended)

    # -- internals ----------------------------------------------------------------------

    def _record(
        self, volume: str, op: Op, offset: int, length: int, payload: bytes | memoryview
    ) -> None:
        if self.mode is Mode.JOURNAL and self._append(volume, op, offset, length, payload, 0):
            self.store.write_pending()  # before the volume write: see the module docstring
            return
        if self.mode is not Mode.OFF:
            self.bitmaps[volume].mark(offset, length)

    def _append(
        self, volume: str, op: Op, offset: int, length: int, payload: bytes | memoryview, flags: int
    ) -> bool:
        store = self.store
        seq = store.next_seq
        record = encode_record(seq, volume, op, offset, length, payload, time.time_ns(), flags)
        try:
            store.append(seq, record)
        except JournalFull:
            log.warning(
                "journal full (%d of %d bytes) at seq %d: suspending the pair",
                store.used_bytes,
                store.capacity_bytes,
                seq,
            )
            self._on_full()  # switches to Mode.BITMAP
            return False
        self.records_appended += 1
        waiter = self._appended
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def _rebase(self, volume: str, offset: int, length: int, why: str) -> None:
        log.warning(
            "volume %s %d+%d: journaling its content again: %s", volume, offset, length, why
        )
        end = offset + length
        while offset < end and self.mode is Mode.JOURNAL:
            step = min(end - offset, REBASE_STEP_BYTES)
            try:
                data = self.volumes[volume].read(offset, step)
            except OSError as exc:
                log.error("volume %s: cannot read %d+%d back: %s", volume, offset, step, exc)
                break
            if data.count(0) == step:
                appended = self.append_base_hole(volume, offset, step)
            else:
                appended = self.append_base(volume, offset, data)
            if not appended:
                break
            offset += step
        if offset < end:  # not journaled: the bitmap keeps it for the next resync
            self.bitmaps[volume].mark(offset, end - offset)

    def _prepare_sync(self) -> Callable[[], None]:
        ticket = self.store.prepare_sync()
        return ticket.run


def _volume_holds(volume: Volume, entry: Entry) -> bool:
    """Whether the volume's content at the entry's region is what the entry wrote."""
    step = 1 << 20
    for start in range(0, entry.length, step):
        n = min(step, entry.length - start)
        actual = volume.read(entry.offset + start, n)
        if entry.op is Op.WRITE:
            if actual != entry.payload[start : start + n]:
                return False
        elif actual.count(0) != n:
            return False
    return True
