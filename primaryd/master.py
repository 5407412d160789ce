"""The primary's master journal: every host write of the group, in order, with a seq.

    NBD batch of writes ─► wrote()/trimmed()/zeroed() each ─► flush_records() ─► volume I/O
                              │ mode JOURNAL: encode, append to the tail (memory)
                              │ mode BITMAP: mark the difference bitmap (and the mark log)
                              │ mode OFF (SMPL): nothing
                           flush_records(): the tail into the segment file, one write
                                            (page cache: survives a SIGKILL)
    Records reach the file before their data can reach the volume, a batch at a time, so
    after a SIGKILL only the last batch's records can lack their volume writes: check_tail()
    compares the newest CHECK_TAIL_RECORDS records with the volumes at start and journals
    the actual content of every region that differs.
    FLUSH / FUA ─► sync(): group commit, fdatasync of the segments in an executor
    copier ─► append_base_ref(): base-journal records, ordered with host writes by seq,
              holding no data: read() puts the P-VOL's data in when the secondary asks
    link server ─► read(): the records for a ReadJournal, references filled in

A full journal never fails a host write: on_full() is called (the group suspends the pair,
PFUS) and the write is marked in the bitmap instead. Nor does a journal disk that fails
(ENOSPC, EIO on a write or an fdatasync): on_failed() is called (PSUE, the records the
secondary has not restored go to the bitmaps, the journal is emptied) and the host I/O goes
on; only the volume's own I/O errors reach hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping

from common.bitmap import DifferenceBitmap
from common.journal.record import (
    FLAG_BASE,
    FLAG_REF,
    Entry,
    Op,
    decode_record,
    encode_record,
)
from common.journal.store import JournalFull, JournalStore
from common.marklog import MarkLog
from common.syncer import GroupSyncer
from common.volume import Volume, is_zeros

log = logging.getLogger("journalpair.journal")


REBASE_STEP_BYTES = 1 << 20
# At least common.nbd.server.JOURNAL_BATCH_REQUESTS: the records a kill can leave unapplied.
CHECK_TAIL_RECORDS = 1024


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
        marks: MarkLog,
        on_failed: Callable[[str], None],
    ) -> None:
        self.store = store
        self.volumes = volumes
        self.bitmaps = bitmaps
        self.marks = marks
        self.mode = Mode.OFF
        self._on_full = on_full
        self._on_failed = on_failed
        self._syncer = GroupSyncer(prepare=self._prepare_sync)
        self._appended: asyncio.Future[None] | None = None
        self.records_appended = 0
        self.host_marks = 0  # host writes marked in the bitmaps (the pair is split)
        # Reference records may exist up to this seq: any recovered record may be one.
        self._refs_upto = store.last_seq
        # The data a reference was filled in with holds host writes up to this seq, so the
        # S-VOLs are a consistent image only once applied this far. At start: whatever was
        # sent before the stop was read while last_seq was at most what it is now.
        self.ref_horizon_seq = store.last_seq
        self.on_ref_sent: Callable[[int], None] | None = None  # bytes read for a reference
        # Inflow control (pair.inflow_control): how long the NBD server holds the reply to a
        # host write; set by the group's RPO watch, 0 when under the target.
        self.ack_delay_s = 0.0

    # -- the NBD WriteJournal hooks ----------------------------------------------------

    def wrote(self, volume: str, offset: int, payload: bytes | memoryview) -> None:
        self._record(volume, Op.WRITE, offset, len(payload), payload)

    def trimmed(self, volume: str, offset: int, length: int) -> None:
        self._record(volume, Op.TRIM, offset, length, b"")

    def zeroed(self, volume: str, offset: int, length: int) -> None:
        self._record(volume, Op.ZERO, offset, length, b"")

    def failed(self, volume: str, offset: int, length: int) -> None:
        self._rebase(volume, offset, length, "the volume write failed")

    def flush_records(self) -> None:
        if self.store.pending_bytes:
            try:
                self.store.write_pending()
            except OSError as exc:
                self._failed(f"cannot write the master journal: {exc}")
        self.marks.flush()

    async def sync(self) -> None:
        """FLUSH / FUA: the records so far are durable. A failed fdatasync suspends the pair
        (after one, the kernel may have dropped the pages: a retry proves nothing); the
        records' regions are then in the saved bitmaps, so the host's flush holds."""
        try:
            await self._syncer.sync()
        except OSError as exc:
            self._failed(f"cannot fdatasync the master journal: {exc}")

    def _failed(self, why: str) -> None:
        if self.mode is Mode.JOURNAL:  # once: the store is emptied by the suspension
            self._on_failed(why)

    def check_tail(self) -> bool:
        """At start: do the volumes hold what the newest records say? If not (killed between
        a batch's records and its volume writes), journal those regions' actual content."""
        store = self.store
        if self.mode is not Mode.JOURNAL or store.last_seq < store.first_seq:
            return True
        first = max(store.first_seq, store.last_seq - CHECK_TAIL_RECORDS + 1)
        entries: list[Entry] = []
        while first <= store.last_seq:
            chunk = store.entries(first, CHECK_TAIL_RECORDS, 64 << 20)
            entries.extend(chunk)
            first = chunk[-1].seq + 1
        stale = _regions_not_on_volumes(self.volumes, entries)
        for volume, offset, length in stale:
            self._rebase(volume, offset, length, "its last write never reached the volume")
        self.flush_records()
        return not stale

    # -- base journal (initial copy, resync) -----------------------------------------

    def append_base(self, volume: str, offset: int, payload: bytes) -> bool:
        """False when the journal is full (the pair has been suspended)."""
        return self._append(volume, Op.WRITE, offset, len(payload), payload, FLAG_BASE)

    def append_base_hole(self, volume: str, offset: int, length: int) -> bool:
        return self._append(volume, Op.TRIM, offset, length, b"", FLAG_BASE)

    def append_base_ref(self, volume: str, offset: int, length: int) -> bool:
        """A base record of `length` bytes (at most MAX_WRITE_BYTES) whose data read() takes
        from the P-VOL when it is sent: the copy costs the journal a header, not the data.

        Reading later than the seq was given is safe for the copy: a host write before the
        seq is in the data; one after it is in the data too, and its own record, applied
        later, writes the same bytes again. Until the secondary applied every seq up to
        the last read (ref_horizon_seq) the S-VOLs mix times, which is what COPY means."""
        appended = self._append(volume, Op.WRITE, offset, length, b"", FLAG_BASE | FLAG_REF)
        if appended:
            self._refs_upto = self.store.last_seq
        return appended

    # -- reading for the secondary ------------------------------------------------------

    def read(self, from_seq: int, max_entries: int, max_bytes: int) -> tuple[bytes, int]:
        """Records from `from_seq` as the secondary gets them: (blob, count). A reference is
        replaced by a base WRITE of the P-VOL's data now (a TRIM when it is all zeros);
        the blob stays within max_bytes unless its first record alone is bigger.
        OSError when a P-VOL cannot be read."""
        blob, count = self.store.read(from_seq, max_entries, max_bytes)
        if from_seq > self._refs_upto or not count:
            return blob, count
        parts: list[bytes | memoryview] = []
        total = taken = pos = 0
        view = memoryview(blob)
        while taken < count:
            entry, end = decode_record(view, pos, check_payload=False)
            record: bytes | memoryview = view[pos:end]
            if entry.flags & FLAG_REF:
                record = self._filled_in(entry)
            if taken and total + len(record) > max_bytes:
                break
            parts.append(record)
            total += len(record)
            taken += 1
            pos = end
        self.ref_horizon_seq = max(self.ref_horizon_seq, self.store.last_seq)
        return b"".join(parts), taken

    def _filled_in(self, ref: Entry) -> bytes:
        data = self.volumes[ref.volume].read(ref.offset, ref.length)
        if self.on_ref_sent is not None:
            self.on_ref_sent(ref.length)
        if is_zeros(data):
            return encode_record(
                ref.seq,
                ref.volume,
                Op.TRIM,
                ref.offset,
                ref.length,
                b"",
                ref.timestamp_ns,
                FLAG_BASE,
            )
        return encode_record(
            ref.seq,
            ref.volume,
            Op.WRITE,
            ref.offset,
            ref.length,
            data,
            ref.timestamp_ns,
            FLAG_BASE,
        )

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
            return
        if self.mode is not Mode.OFF:
            self.marks.mark(volume, offset, length)
            self.host_marks += 1

    def _append(
        self, volume: str, op: Op, offset: int, length: int, payload: bytes | memoryview, flags: int
    ) -> bool:
        store = self.store
        seq = store.next_seq
        record = encode_record(seq, volume, op, offset, length, payload, time.time_ns(), flags)
        try:
            store.append(seq, record)
        except OSError as exc:  # nothing appended: _record marks the write instead
            self._failed(f"cannot write the master journal at seq {seq}: {exc}")
            return False
        except JournalFull:
            log.warning(
                "journal full (%d of %d bytes) at seq %d: suspending the pair",
                store.used_bytes,
                store.capacity_bytes,
                seq,
                extra={"seq": seq, "volume": volume},
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
            "volume %s %d+%d: journaling its content again: %s",
            volume,
            offset,
            length,
            why,
            extra={"volume": volume},
        )
        end = offset + length
        while offset < end and self.mode is Mode.JOURNAL:
            step = min(end - offset, REBASE_STEP_BYTES)
            try:
                data = self.volumes[volume].read(offset, step)
            except OSError as exc:
                log.error("volume %s: cannot read %d+%d back: %s", volume, offset, step, exc)
                break
            if is_zeros(data):
                appended = self.append_base_hole(volume, offset, step)
            else:
                appended = self.append_base(volume, offset, data)
            if not appended:
                break
            offset += step
        if offset < end:  # not journaled: the bitmap keeps it for the next resync
            self.marks.mark(volume, offset, end - offset)
            self.marks.flush()

    def _prepare_sync(self) -> Callable[[], None]:
        ticket = self.store.prepare_sync()
        return ticket.run


def _regions_not_on_volumes(
    volumes: Mapping[str, Volume], entries: list[Entry]
) -> list[tuple[str, int, int]]:
    """Regions where the newest of `entries` touching them differs from the volume.

    Newest first: a part of a region that a newer entry covers is that entry's to check."""
    covered: dict[str, list[tuple[int, int]]] = {}
    stale: list[tuple[str, int, int]] = []
    for entry in reversed(entries):
        done = covered.setdefault(entry.volume, [])
        for start, end in _uncovered(entry.offset, entry.offset + entry.length, done):
            if not _volume_holds(volumes[entry.volume], entry, start, end):
                stale.append((entry.volume, start, end - start))
        done.append((entry.offset, entry.offset + entry.length))
    return stale


def _uncovered(start: int, end: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    parts = [(start, end)]
    for c_start, c_end in covered:
        parts = [
            piece
            for p_start, p_end in parts
            for piece in ((p_start, min(p_end, c_start)), (max(p_start, c_end), p_end))
            if piece[0] < piece[1]
        ]
    return parts


def _volume_holds(volume: Volume, entry: Entry, start: int, end: int) -> bool:
    """Whether the volume holds what the entry wrote in [start, end) (within its region).
    A reference holds whatever the volume holds: that is what it will send."""
    if entry.flags & FLAG_REF:
        return True
    step = 1 << 20
    if entry.op is not Op.WRITE:  # zeros expected: holes match without reading them
        position = start
        while position < end:
            extents = volume.extents(position, end - position)
            for extent in extents:
                if not extent.hole and not _zeros(volume, extent.offset, extent.length):
                    return False
            position = extents[-1].offset + extents[-1].length
        return True
    for position in range(start, end, step):
        n = min(step, end - position)
        at = position - entry.offset
        if volume.read(position, n) != entry.payload[at : at + n]:
            return False
    return True


def _zeros(volume: Volume, offset: int, length: int) -> bool:
    step = 1 << 20
    for position in range(offset, offset + length, step):
        n = min(step, offset + length - position)
        if not is_zeros(volume.read(position, n)):
            return False
    return True
