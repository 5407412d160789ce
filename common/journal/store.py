"""Journal segment files: append in seq order, read ranges by seq, release whole segments.

    append(seq, record) ─► pending tail (memory, ≤ pending_bytes_max)
                             │ write_pending(): pwrite into the page cache, no fsync
                             ▼
    {dir}/00000000000000000001.seg   [segment header][rec 1][rec 2] ... [rec k]
    {dir}/0000000000000000000k+1.seg [segment header][rec k+1] ...   ◄─ active (the last)
    prepare_sync() ─► SyncTicket (dup'ed fds) ─ run() in an executor ─► fdatasync, fsync(dir)
    release(upto)  ─► the oldest segments whose records all have seq ≤ upto: unlinked, or
                      renamed {n}.spare (at most SPARES_MAX, within capacity) for a later
                      segment to reuse: overwriting a file's cached pages costs a fraction of
                      filling new ones (4.7 GiB/s vs 0.58 GiB/s on the CI VM), and its
                      fdatasync has no block allocation to commit

Segment header, 20 bytes little-endian: magic b"JPSG", version u16, reserved u16 (0),
first_seq u64, crc32c u32 of the 16 bytes before it. Records follow back to back (see
`record`), seqs contiguous across segments. Segment files are named after their first seq.

The store is single-threaded: only `SyncTicket.run()` may run on another thread, and it
touches nothing but its own dup'ed fds and the store's sync_latency histogram (one ticket
runs at a time: the master journal's GroupSyncer, the secondary's one restore sync).

Reading by seq uses, per segment, the file offset of every INDEX_STRIDE-th record (a
sparse index: a 1 GiB journal of 4 KiB records needs 32 KiB), and a cursor where the
previous read ended, so the sequential reader never scans.

A store whose every record was released keeps an empty segment named after next_seq,
so that a restart resumes at the same seq instead of at 1.

A reused segment still holds an older segment's bytes after its own records. They end the
segment's records at recovery like a torn tail does: their seqs are all older than the
segment's first (spares are only reused in one line of seqs: reset() and a restart drop
them). A power loss may keep the rename of a spare but not its new header: a last segment
whose header is an older segment's holds no records of its own, and gets its header back.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crc32c import crc32c

from common.journal.record import (
    HEADER_BYTES,
    MAGIC,
    MAX_NAME_BYTES,
    BytesLike,
    CorruptRecord,
    Entry,
    RecordHeader,
    TruncatedRecord,
    check_record,
    decode_header,
    iter_records,
    parse_header,
    peek_header,
)
from common.metrics.histogram import LatencyHistogram

log = logging.getLogger("journalpair.journal")

MiB = 1 << 20
SEGMENT_MAGIC = b"JPSG"
SEGMENT_VERSION = 1
_SEGMENT_FIELDS = struct.Struct("<4sHHQ")
_SEGMENT_HEADER = struct.Struct("<4sHHQI")
SEGMENT_HEADER_BYTES = _SEGMENT_HEADER.size  # 20
SEGMENT_BYTES_MAX = 64 * MiB  # default target size of a segment file
SEGMENT_BYTES_MIN = 4096  # smaller segments would be mostly header and file-system overhead
INDEX_STRIDE = 64  # index the file offset of every 64th record
PENDING_BYTES_MAX = 8 * MiB
READ_BYTES_MAX = 64 * MiB  # a read() returns no more, except one bigger record
OPEN_SEGMENTS_MAX = 64  # fds kept open for reading; the active and unsynced ones always
SPARES_MAX = 4  # released segment files kept for reuse
SPARE_SUFFIX = ".spare"
_SCAN_CHUNK_BYTES = 4 * MiB
_HEADER_PEEK_BYTES = HEADER_BYTES + MAX_NAME_BYTES
_SKIP_WINDOW_BYTES = 1 * MiB  # one read for the <64 headers between two indexed records


class JournalFull(Exception):
    """Appending would exceed capacity_bytes; nothing was changed."""


class JournalCorrupt(Exception):
    """Damage that is not a torn tail; the message names the file and offset."""


@dataclass
class RecoveryReport:
    first_seq: int
    last_seq: int
    records: int
    segments: int
    bytes_cut: int
    cut_reason: str | None


@dataclass(eq=False, slots=True)
class _Segment:
    path: Path
    first_seq: int
    next_seq: int  # one past its last record
    size_bytes: int  # header + records, pending bytes included for the active segment
    written_bytes: int  # of which already in the file
    index: array[int] = field(default_factory=lambda: array("Q"))
    fd: int = -1
    released: bool = False

    def add_record(self, offset: int, record_bytes: int) -> None:
        if (self.next_seq - self.first_seq) % INDEX_STRIDE == 0:
            self.index.append(offset)
        self.next_seq += 1
        self.size_bytes += record_bytes


@dataclass(slots=True)
class _Damage:
    offset: int
    seq: int  # of the record that should have been there
    reason: str


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def _segment_header(first_seq: int) -> bytes:
    fields = _SEGMENT_FIELDS.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, first_seq)
    return fields + struct.pack("<I", crc32c(fields))


def _pwrite_all(fd: int, data: BytesLike, offset: int) -> int:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    done = 0
    with memoryview(data) as view:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    return done


class SyncTicket:
    """Makes what was appended before `prepare_sync()` durable; `run()` blocks.

    Holds dup'ed fds so that release() closing the originals cannot race with it.
    An OSError from run() means durability is unknown: treat it as fatal for the journal
    (after a failed fsync the kernel may drop the dirty pages and a retry can "succeed").
    """

    def __init__(
        self,
        segments: frozenset[_Segment],
        file_fds: list[int],
        dir_fd: int | None,
        upto_seq: int,
        on_durable: Callable[[int], None],
        latency: LatencyHistogram,
    ):
        self.segments = segments
        self.syncs_dir = dir_fd is not None
        self.succeeded = False
        self.upto_seq = upto_seq  # every record up to this seq is durable once run() returns
        self._on_durable = on_durable
        self._file_fds = file_fds
        self._dir_fd = dir_fd
        self._latency = latency

    def run(self) -> None:
        started_ns = time.monotonic_ns()
        try:
            for fd in self._file_fds:
                os.fdatasync(fd)
            if self._dir_fd is not None:
                os.fsync(self._dir_fd)
            self.succeeded = True
        finally:
            self._latency.observe_ns(time.monotonic_ns() - started_ns)
            self.close()
        self._on_durable(self.upto_seq)

    def close(self) -> None:
        fds, self._file_fds = self._file_fds, []
        if self._dir_fd is not None:
            fds.append(self._dir_fd)
            self._dir_fd = None
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class JournalStore:
    def __init__(
        self,
        directory: Path,
        capacity_bytes: int,
        segment_bytes: int | None,
        log_name: str,
        pending_bytes_max: int,
    ) -> None:
        if segment_bytes is None:
            segment_bytes = max(MiB, min(SEGMENT_BYTES_MAX, capacity_bytes // 8))
        if min(segment_bytes, capacity_bytes) < SEGMENT_BYTES_MIN:
            raise ValueError(
                f"{log_name}: segment_bytes {segment_bytes} and capacity_bytes "
                f"{capacity_bytes} must be at least {SEGMENT_BYTES_MIN}"
            )
        self.directory = directory
        self.capacity_bytes = capacity_bytes
        self.segment_bytes = segment_bytes
        self.log_name = log_name
        self.pending_bytes_max = pending_bytes_max
        self._segments: list[_Segment] = []
        self._pending = bytearray()  # tail of the last segment, not yet written
        self._next_seq = 1
        self._used_bytes = 0
        self._dir_fd = -1
        self._open_fds: OrderedDict[_Segment, None] = OrderedDict()  # LRU
        self._dirty: set[_Segment] = set()  # written since the last prepare_sync
        self._dir_dirty = False
        self._last_ticket: SyncTicket | None = None
        self._durable_seq = 0
        self._cursor: tuple[int, _Segment, int] | None = None  # (seq, segment, offset)
        self._spares: list[tuple[Path, int]] = []  # (path, file bytes), the newest last
        # How long each SyncTicket.run() took (every fdatasync of this journal): metrics.
        self.sync_latency = LatencyHistogram()

    @classmethod
    def open(
        cls,
        directory: Path,
        capacity_bytes: int,
        segment_bytes: int | None = None,
        *,
        log_name: str = "journal",
        pending_bytes_max: int = PENDING_BYTES_MAX,
    ) -> tuple[JournalStore, RecoveryReport]:
        """Open (creating the directory) and recover: cut a torn tail, refuse other damage."""
        store = cls(directory, capacity_bytes, segment_bytes, log_name, pending_bytes_max)
        try:
            report = store._recover()
            store.prepare_sync().run()  # what a killed process left in the page cache
        except BaseException:
            store.close()
            raise
        return store, report

    # -- positions -----------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self._segments[0].first_seq if self._segments else self._next_seq

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def index_entries(self) -> int:
        """Entries of the sparse seq -> offset index (its memory is 8 bytes each)."""
        return sum(len(seg.index) for seg in self._segments)

    # -- appending -----------------------------------------------------------

    def append(self, seq: int, record: BytesLike) -> None:
        """Append one encoded record carrying `seq` (which must be next_seq)."""
        if seq != self._next_seq:
            raise ValueError(f"{self.log_name}: append seq {seq}, expected {self._next_seq}")
        try:  # a cheap look, no crc: our own encoder made it
            header_seq, record_bytes = peek_header(record)
        except TruncatedRecord as exc:
            raise ValueError(f"{self.log_name}: append of a bad record: {exc}") from None
        if header_seq != seq or record_bytes != len(record):
            raise ValueError(
                f"{self.log_name}: record says seq {header_seq} of {record_bytes} bytes, "
                f"appended as seq {seq} of {len(record)} bytes"
            )
        rolls = self._rolls(len(record))
        self._check_capacity(len(record) + (SEGMENT_HEADER_BYTES if rolls else 0))
        self._append_one(record, rolls)

    def append_blob(self, first_seq: int, blob: BytesLike, count: int) -> None:
        """Append `count` encoded records received as one batch, all or nothing.

        Every record is fully checked (payload crc too): once it is in the restore journal
        the primary may release its copy. An OSError part way leaves a prefix appended.
        """
        if first_seq != self._next_seq:
            raise ValueError(
                f"{self.log_name}: blob from seq {first_seq}, expected {self._next_seq}"
            )
        sizes = _check_blob(blob, first_seq, count)
        self._check_capacity(self._space_for(sizes))
        with memoryview(blob) as view:
            pos = 0
            for size in sizes:
                self._append_one(view[pos : pos + size], self._rolls(size))
                pos += size

    def _check_capacity(self, need_bytes: int) -> None:
        if self._used_bytes + need_bytes > self.capacity_bytes:
            raise JournalFull(
                f"{self.log_name} full: {self._used_bytes} bytes used + {need_bytes} needed "
                f"> capacity {self.capacity_bytes}"
            )

    def _rolls(self, size: int) -> bool:
        """Whether a record of `size` bytes goes into a new segment."""
        if not self._segments:
            return True
        active = self._segments[-1]
        return self._full(active.size_bytes, active.next_seq > active.first_seq, size)

    def _full(self, segment_bytes: int, has_records: bool, size: int) -> bool:
        # A record bigger than a whole segment still gets one segment to itself.
        return has_records and segment_bytes + size > self.segment_bytes

    def _space_for(self, sizes: list[int]) -> int:
        """Bytes that appending records of these sizes adds, segment headers included."""
        need_bytes = 0
        segment_bytes, has_records = 0, True  # as if a full segment, when there is none
        if self._segments:
            active = self._segments[-1]
            segment_bytes, has_records = active.size_bytes, active.next_seq > active.first_seq
        for i, size in enumerate(sizes):
            if (i == 0 and not self._segments) or self._full(segment_bytes, has_records, size):
                need_bytes += SEGMENT_HEADER_BYTES
                segment_bytes = SEGMENT_HEADER_BYTES
            segment_bytes += size
            need_bytes += size
            has_records = True
        return need_bytes

    def _append_one(self, record: BytesLike, rolls: bool) -> None:
        """Append the next record; capacity was checked. On OSError nothing is appended."""
        size = len(record)
        if rolls:
            self.write_pending()
            self._start_segment(self._next_seq)
        elif self._pending and len(self._pending) + size > self.pending_bytes_max:
            self.write_pending()
        active = self._segments[-1]
        active.add_record(active.size_bytes, size)
        self._pending += record
        self._next_seq += 1
        self._used_bytes += size

    def _start_segment(self, first_seq: int) -> _Segment:
        path = self.directory / segment_name(first_seq)
        header = _segment_header(first_seq)
        fd = self._reuse_spare(path, header)
        if fd < 0:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _pwrite_all(fd, header, 0)
            except OSError:
                os.close(fd)
                path.unlink()
                raise
        seg = _Segment(path, first_seq, first_seq, len(header), len(header), fd=fd)
        self._segments.append(seg)
        self._remember_fd(seg)
        self._dirty.add(seg)
        self._dir_dirty = True
        self._used_bytes += len(header)
        return seg

    def _reuse_spare(self, path: Path, header: bytes) -> int:
        """A spare renamed to `path` with `header` in it: its fd, or -1 (none, or it
        failed: a fresh file is as good)."""
        while self._spares:
            spare, _ = self._spares.pop()
            self._spare_bytes_changed()
            try:
                fd = os.open(spare, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("%s: spare %s unusable: %s", self.log_name, spare.name, exc)
                continue
            try:
                # No fdatasync here (it would flush the spare's old dirty pages on the loop):
                # a power loss may leave the new name with the old header, which recovery
                # takes for a reused segment without records of its own.
                _pwrite_all(fd, header, 0)
                os.rename(spare, path)
            except OSError as exc:
                os.close(fd)
                log.warning("%s: spare %s unusable: %s", self.log_name, spare.name, exc)
                spare.unlink(missing_ok=True)
                continue
            return fd
        return -1

    def _keep_as_spare(self, seg: _Segment) -> bool:
        """Rename a released segment for reuse when it is a full one and room is left."""
        spare_bytes = sum(size for _, size in self._spares)
        if (
            len(self._spares) >= SPARES_MAX
            or seg.written_bytes < self.segment_bytes // 2
            or self._used_bytes + spare_bytes + seg.written_bytes > self.capacity_bytes
        ):
            return False
        spare = seg.path.with_suffix(SPARE_SUFFIX)
        try:
            os.rename(seg.path, spare)
        except OSError as exc:
            log.warning("%s: cannot keep %s as a spare: %s", self.log_name, seg.path.name, exc)
            return False
        self._spares.append((spare, seg.written_bytes))
        self._spare_bytes_changed()
        return True

    def _drop_spares(self) -> None:
        for spare, _ in self._spares:
            spare.unlink(missing_ok=True)
        self._spares.clear()
        self._spare_bytes_changed()

    def _spare_bytes_changed(self) -> None:
        self._dir_dirty = True

    @property
    def spare_count(self) -> int:
        return len(self._spares)

    # -- writing and syncing -------------------------------------------------

    def write_pending(self) -> int:
        """Write the pending tail into its segment file (page cache only); bytes written."""
        pending = self._pending
        if not pending:
            return 0
        active = self._segments[-1]
        fd = self._fd_of(active)
        done = 0
        try:
            done = os.pwrite(fd, pending, active.written_bytes)
            if done < len(pending):  # short writes are rare: then loop over the rest
                with memoryview(pending) as view:
                    while done < len(view):
                        done += os.pwrite(fd, view[done:], active.written_bytes + done)
        finally:
            if done:
                active.written_bytes += done
                del self._pending[:done]
                self._dirty.add(active)
        return done

    def prepare_sync(self) -> SyncTicket:
        """Write pending, then a ticket whose run() makes everything so far durable."""
        self.write_pending()
        segments = set(self._dirty)
        syncs_dir = self._dir_dirty
        last = self._last_ticket
        if last is not None and not last.succeeded:
            # Still running (or failed, or dropped): this ticket must not finish before it.
            segments |= last.segments
            syncs_dir = syncs_dir or last.syncs_dir
        live = frozenset(seg for seg in segments if not seg.released)
        fds: list[int] = []
        try:
            for seg in live:
                fds.append(os.dup(self._fd_of(seg)))
            dir_fd = os.dup(self._dir_fd) if syncs_dir else None
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self._dirty.clear()
        self._dir_dirty = False
        self._last_ticket = SyncTicket(
            live, fds, dir_fd, self.last_seq, self._mark_durable, self.sync_latency
        )
        return self._last_ticket

    @property
    def durable_seq(self) -> int:
        """The highest seq known to be on disk (fdatasync'ed): what a restore journal may
        report as restored and a destager may apply."""
        return self._durable_seq

    def _mark_durable(self, upto_seq: int) -> None:
        # Called from the executor thread that ran the ticket: one int store, no lock needed.
        self._durable_seq = max(self._durable_seq, min(upto_seq, self._next_seq - 1))

    # -- reading -------------------------------------------------------------

    def read(self, from_seq: int, max_entries: int, max_bytes: int) -> tuple[bytes, int]:
        """Encoded records from `from_seq` on: (blob, count), at least one if any exists."""
        self._check_from(from_seq)
        if from_seq == self._next_seq or max_entries <= 0:
            return b"", 0
        max_bytes = min(max_bytes, READ_BYTES_MAX)
        seg, offset = self._locate(from_seq)
        parts: list[bytes] = []
        seq, total_bytes = from_seq, 0
        while True:
            chunk, count = self._read_run(
                seg,
                offset,
                seq,
                max_entries - (seq - from_seq),
                max_bytes - total_bytes,
                at_least_one=not parts,
            )
            if count == 0:
                break
            parts.append(chunk)
            seq += count
            offset += len(chunk)
            total_bytes += len(chunk)
            if seq != seg.next_seq or seq == self._next_seq or total_bytes >= max_bytes:
                break  # stopped inside this segment by a limit, or everything was read
            if seq - from_seq >= max_entries:
                break
            seg, offset = self._segment_of(seq), SEGMENT_HEADER_BYTES
        self._cursor = (seq, seg, offset)
        return (parts[0] if len(parts) == 1 else b"".join(parts)), seq - from_seq

    def entries(
        self, from_seq: int, max_entries: int, max_bytes: int, *, check_payload: bool = True
    ) -> list[Entry]:
        """read() and decode, payload crcs checked unless check_payload=False (for records
        already checked by append_blob or by recovery at open)."""
        blob, _ = self.read(from_seq, max_entries, max_bytes)
        try:
            return list(iter_records(blob, check_payload=check_payload))
        except (TruncatedRecord, CorruptRecord) as exc:
            raise JournalCorrupt(f"{self.log_name}: reading from seq {from_seq}: {exc}") from None

    def iter_entries(self, from_seq: int, *, check_payload: bool = True) -> Iterator[Entry]:
        """Every record from `from_seq` (at least first_seq) to the last, read in bounded
        chunks (a whole journal never sits in memory)."""
        seq = max(from_seq, self.first_seq)
        while seq <= self.last_seq:
            entries = self.entries(seq, 4096, 16 << 20, check_payload=check_payload)
            yield from entries
            seq = entries[-1].seq + 1

    def _check_from(self, from_seq: int) -> None:
        if not self.first_seq <= from_seq <= self._next_seq:
            raise ValueError(
                f"{self.log_name}: seq {from_seq} not held "
                f"(first {self.first_seq}, next {self._next_seq})"
            )

    def _read_run(
        self,
        seg: _Segment,
        offset: int,
        seq: int,
        max_entries: int,
        budget_bytes: int,
        *,
        at_least_one: bool,
    ) -> tuple[bytes, int]:
        """Whole records of one segment from `offset` within the budget.

        `at_least_one` returns a record even over budget, so that one record bigger
        than the reader's max_bytes cannot stall it.
        """
        max_entries = min(max_entries, seg.next_seq - seq)
        # The index bounds where the wanted records end: do not read far past them.
        k = -(-(seq + max_entries - seg.first_seq) // INDEX_STRIDE)
        end = seg.index[k] if k < len(seg.index) else seg.size_bytes
        chunk = self._read_at(seg, offset, min(max(budget_bytes, 0), end - offset))
        pos, count = 0, 0
        while count < max_entries:
            try:
                record_bytes = self._record_bytes_at(seg, chunk, pos, offset, seq + count)
            except TruncatedRecord:
                break
            if pos + record_bytes > len(chunk):
                break
            pos += record_bytes
            count += 1
        if count == 0:
            if not at_least_one:
                return b"", 0
            size = self._header_at(seg, offset, seq).record_bytes
            return self._read_at(seg, offset, size), 1
        return (chunk if pos == len(chunk) else chunk[:pos]), count

    def _read_at(self, seg: _Segment, offset: int, size: int) -> bytes:
        """Up to `size` bytes of the segment, from its file and/or the pending tail."""
        end = min(offset + size, seg.size_bytes)
        if offset >= end:
            return b""
        parts = []
        if offset < seg.written_bytes:
            parts.append(self._pread(seg, offset, min(end, seg.written_bytes) - offset))
        if end > seg.written_bytes:
            lo = max(offset, seg.written_bytes) - seg.written_bytes
            with memoryview(self._pending) as view:
                parts.append(bytes(view[lo : end - seg.written_bytes]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _pread(self, seg: _Segment, offset: int, size: int) -> bytes:
        data = os.pread(self._fd_of(seg), size, offset)
        if len(data) < size:  # we never read past what we wrote: someone cut the file
            raise self._corrupt(seg, offset + len(data), "file ends early")
        return data

    def _locate(self, seq: int) -> tuple[_Segment, int]:
        """Segment and file offset of record `seq` (held, < next_seq)."""
        cursor = self._cursor
        if cursor is not None and cursor[0] == seq:
            seg = cursor[1]
            if not seg.released and seg.first_seq <= seq < seg.next_seq:
                return seg, cursor[2]
        seg = self._segment_of(seq)
        k = (seq - seg.first_seq) // INDEX_STRIDE
        indexed_seq = seg.first_seq + k * INDEX_STRIDE
        if indexed_seq == seq:
            return seg, seg.index[k]
        bound = seg.index[k + 1] if k + 1 < len(seg.index) else seg.size_bytes
        return seg, self._skip(seg, seg.index[k], indexed_seq, seq, bound)

    def _skip(self, seg: _Segment, offset: int, seq: int, to_seq: int, bound: int) -> int:
        """Offset of record `to_seq`, walking the headers from record `seq` at `offset`.

        One read covers the walk (up to `bound`, the next indexed record) unless records
        are big; then each header is read on its own.
        """
        base = offset
        window = self._read_at(seg, offset, min(bound - offset, _SKIP_WINDOW_BYTES))
        for skipped in range(seq, to_seq):
            if offset + _HEADER_PEEK_BYTES > base + len(window) and base + len(window) < bound:
                base, window = offset, self._read_at(seg, offset, _HEADER_PEEK_BYTES)
            offset += self._record_bytes_at(seg, window, offset - base, base, skipped)
        return offset

    def _segment_of(self, seq: int) -> _Segment:
        i = bisect.bisect_right(self._segments, seq, key=lambda seg: seg.first_seq) - 1
        return self._segments[i]

    def _record_bytes_at(self, seg: _Segment, buf: bytes, pos: int, base: int, seq: int) -> int:
        """Size of record `seq`, whose header is at buf[pos] (file offset base + pos).

        TruncatedRecord passes through: `buf` may end inside the header.
        """
        try:
            header_seq, record_bytes = decode_header(buf, pos)
        except CorruptRecord as exc:
            raise self._corrupt(seg, base + pos, str(exc)) from None
        if header_seq != seq:
            raise self._corrupt(seg, base + pos, f"seq {header_seq}, expected {seq}")
        return record_bytes

    def _header_at(self, seg: _Segment, offset: int, seq: int) -> RecordHeader:
        try:
            header = parse_header(self._read_at(seg, offset, _HEADER_PEEK_BYTES))
        except (TruncatedRecord, CorruptRecord) as exc:
            raise self._corrupt(seg, offset, str(exc)) from None
        if header.seq != seq:
            raise self._corrupt(seg, offset, f"seq {header.seq}, expected {seq}")
        return header

    def _corrupt(self, seg: _Segment, offset: int, what: str) -> JournalCorrupt:
        return JournalCorrupt(f"{self.log_name}: {seg.path} offset {offset}: {what}")

    # -- lag -----------------------------------------------------------------

    def bytes_between(self, from_seq: int) -> int:
        """Record bytes with seq >= from_seq; exact at segment and index boundaries."""
        if from_seq >= self._next_seq:
            return 0
        from_seq = max(from_seq, self.first_seq)
        total_bytes = 0
        for seg in reversed(self._segments):
            if seg.first_seq >= from_seq:
                total_bytes += seg.size_bytes - SEGMENT_HEADER_BYTES
                continue
            k = (from_seq - seg.first_seq) // INDEX_STRIDE
            total_bytes += seg.size_bytes - seg.index[k]
            break
        return total_bytes

    def timestamp_ns_of(self, seq: int) -> int | None:
        if not self.first_seq <= seq < self._next_seq:
            return None
        seg, offset = self._locate(seq)
        return self._header_at(seg, offset, seq).timestamp_ns

    # -- releasing -----------------------------------------------------------

    def release(self, upto_seq: int) -> int:
        """Drop the oldest segments whose records all have seq <= upto_seq; bytes freed."""
        upto_seq = min(upto_seq, self.last_seq)
        freed_bytes = 0
        while self._segments:
            seg = self._segments[0]
            if seg.next_seq == seg.first_seq or seg.next_seq - 1 > upto_seq:
                break  # an empty segment is only ever the last: it marks next_seq
            freed_bytes += self._drop_oldest(recycle=True)
        if freed_bytes and not self._segments:
            self._start_segment(self._next_seq)
        return freed_bytes

    def reset(self, next_seq: int) -> None:
        """Drop every record; the next append must carry `next_seq`. Spares go too: the
        new seqs may be lower than theirs, and recovery tells stale bytes by their seq."""
        self._drop_spares()
        while self._segments:
            self._drop_oldest(recycle=False)
        self._next_seq = next_seq
        self._durable_seq = next_seq - 1
        try:
            self._start_segment(next_seq)
        except OSError as exc:  # a full or failing disk: the next append tries again
            log.warning("%s: no segment for seq %d yet: %s", self.log_name, next_seq, exc)

    def _drop_oldest(self, *, recycle: bool) -> int:
        seg = self._segments[0]
        self._segments.pop(0)
        if not (recycle and self._segments and self._keep_as_spare(seg)):
            seg.path.unlink()
        seg.released = True
        if not self._segments:
            self._pending.clear()  # it was this segment's tail
        self._close_fd(seg)
        self._dirty.discard(seg)
        self._dir_dirty = True
        self._used_bytes -= seg.size_bytes
        if self._cursor is not None and self._cursor[1] is seg:
            self._cursor = None
        return seg.size_bytes

    # -- file descriptors ----------------------------------------------------

    def _fd_of(self, seg: _Segment) -> int:
        if seg.fd < 0:
            seg.fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
            self._remember_fd(seg)
        else:
            self._open_fds.move_to_end(seg)
        return seg.fd

    def _remember_fd(self, seg: _Segment) -> None:
        self._open_fds[seg] = None
        if len(self._open_fds) <= OPEN_SEGMENTS_MAX:
            return
        active = self._segments[-1] if self._segments else None
        for old in list(self._open_fds):
            if len(self._open_fds) <= OPEN_SEGMENTS_MAX:
                break
            if old is not active and old is not seg and old not in self._dirty:
                self._close_fd(old)

    def _close_fd(self, seg: _Segment) -> None:
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
            del self._open_fds[seg]

    def close(self) -> None:
        """Write pending and close every fd; no fsync (use prepare_sync first)."""
        try:
            self.write_pending()
        finally:
            for seg in list(self._open_fds):
                self._close_fd(seg)
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1

    # -- recovery ------------------------------------------------------------

    def _recover(self) -> RecoveryReport:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for stray in [*self.directory.glob("*.tmp"), *self.directory.glob("*" + SPARE_SUFFIX)]:
            stray.unlink()
            self._dir_dirty = True
        paths = self._segment_paths()
        # Segments after the last one with records hold none: a crash may leave an empty one
        # behind a segment whose unsynced tail it lost, so the tail of the last segment
        # with records may be cut too.
        with_records = len(paths)
        while with_records > 0 and not _holds_records(*paths[with_records - 1]):
            with_records -= 1
        bytes_cut, cut_reason = 0, None
        for i, (first_seq, path) in enumerate(paths):
            if i >= with_records and self._segments and first_seq != self._segments[-1].next_seq:
                cut_reason = self._remove_empty_segment(path)
                continue
            next_first = paths[i + 1][0] if i + 1 < len(paths) else None
            seg, cut = self._load_segment(
                path, first_seq, is_last=i >= with_records - 1, next_first_seq=next_first
            )
            if self._segments and seg.first_seq != self._segments[-1].next_seq:
                last_seq = self._segments[-1].next_seq - 1
                raise JournalCorrupt(f"{self.log_name}: {path} leaves a seq gap after {last_seq}")
            self._segments.append(seg)
            if cut is not None:
                bytes_cut, cut_reason = cut
        if self._segments:
            self._next_seq = self._segments[-1].next_seq
        self._used_bytes = sum(seg.size_bytes for seg in self._segments)
        records = self._next_seq - self.first_seq
        log.info(
            "%s: recovered %d records, seq %d..%d, in %d segments",
            self.log_name, records, self.first_seq, self.last_seq, len(self._segments),
        )  # fmt: skip
        return RecoveryReport(
            self.first_seq, self.last_seq, records, len(self._segments), bytes_cut, cut_reason
        )

    def _remove_empty_segment(self, path: Path) -> str:
        reason = (
            f"empty segment {path.name} no longer follows seq {self._segments[-1].next_seq - 1}"
        )
        log.warning("%s: removed %s", self.log_name, reason)
        path.unlink()
        self._dir_dirty = True
        return reason

    def _segment_paths(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob("*.seg"):
            stem = path.name.removesuffix(".seg")
            if len(stem) != 20 or not (stem.isascii() and stem.isdigit()):
                raise JournalCorrupt(f"{self.log_name}: unexpected segment file {path}")
            found.append((int(stem), path))
        return sorted(found)

    def _load_segment(
        self, path: Path, first_seq: int, *, is_last: bool, next_first_seq: int | None
    ) -> tuple[_Segment, tuple[int, str] | None]:
        """Open, check and index one segment; the last one may get its tail cut."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        seg = _Segment(path, first_seq, first_seq, SEGMENT_HEADER_BYTES, 0, fd=fd)
        self._remember_fd(seg)
        try:
            size = os.fstat(fd).st_size
            cut = self._check_segment_header(seg, size, is_last=is_last)
            damage = self._scan_records(seg, max(size, SEGMENT_HEADER_BYTES))
            if damage is not None:
                # A reused segment ends where the next one begins, an older one's bytes after.
                ends_stale = damage.seq == next_first_seq
                cut = self._cut_tail(seg, size, damage, is_last=is_last or ends_stale)
        except BaseException:
            self._close_fd(seg)
            raise
        seg.written_bytes = seg.size_bytes
        return seg, cut

    def _check_segment_header(
        self, seg: _Segment, size: int, *, is_last: bool
    ) -> tuple[int, str] | None:
        """Validate the header; the last segment's torn (short or zeroed) one is rewritten."""
        data = os.pread(self._fd_of(seg), SEGMENT_HEADER_BYTES, 0)
        expected = _segment_header(seg.first_seq)
        if data == expected:
            return None
        if is_last and (
            len(data) < SEGMENT_HEADER_BYTES or not any(data) or _older_header(data, seg)
        ):
            _pwrite_all(self._fd_of(seg), expected, 0)
            self._dirty.add(seg)
            reason = f"torn segment header of {seg.path.name} rewritten"
            log.warning("%s: %s", self.log_name, reason)
            return len(data), reason
        if len(data) < SEGMENT_HEADER_BYTES:
            raise self._corrupt(seg, 0, f"segment header of {len(data)} bytes")
        magic, version, _, first_seq, crc = _SEGMENT_HEADER.unpack(data)
        what = "bad segment header"
        if magic == SEGMENT_MAGIC and crc == crc32c(data[:-4]):
            what = f"segment header says version {version}, first seq {first_seq}"
        raise self._corrupt(
            seg, 0, f"{what}, expected version {SEGMENT_VERSION}, first seq {seg.first_seq}"
        )

    def _scan_records(self, seg: _Segment, size: int) -> _Damage | None:
        """Index every record (full crc check); the first bad one is returned, not raised."""
        offset = SEGMENT_HEADER_BYTES
        buf, buf_offset = b"", offset
        while offset < size:
            try:
                seq, end = check_record(buf, offset - buf_offset)
            except TruncatedRecord as exc:
                if buf_offset + len(buf) >= size:
                    return _Damage(offset, seg.next_seq, f"torn record: {exc}")
                want = min(max(_SCAN_CHUNK_BYTES, exc.need_bytes), size - offset)
                buf, buf_offset = self._pread(seg, offset, want), offset
                continue
            except CorruptRecord as exc:
                return _Damage(offset, seg.next_seq, str(exc))
            if seq < seg.first_seq:
                return _Damage(offset, seg.next_seq, f"seq {seq} left by a reused segment")
            if seq != seg.next_seq:
                raise self._corrupt(seg, offset, f"seq {seq}, expected {seg.next_seq}")
            record_bytes = end - (offset - buf_offset)
            seg.add_record(offset, record_bytes)
            offset += record_bytes
        return None

    def _cut_tail(
        self, seg: _Segment, size: int, damage: _Damage, *, is_last: bool
    ) -> tuple[int, str]:
        """Cut a torn tail off the last segment; any other damage is JournalCorrupt."""
        where = f"offset {damage.offset} (seq {damage.seq})"
        if not is_last:
            raise self._corrupt(seg, damage.offset, f"{damage.reason}; not the last segment")
        intact = self._intact_record_after(seg, damage, size)
        if intact is not None:
            raise self._corrupt(
                seg,
                damage.offset,
                f"{damage.reason}; yet intact record seq {intact[0]} follows at offset "
                f"{intact[1]}: not a torn tail",
            )
        os.ftruncate(self._fd_of(seg), damage.offset)
        self._dirty.add(seg)
        bytes_cut = size - damage.offset
        reason = f"{damage.reason} at {where} of {seg.path.name}"
        log.warning(
            "%s: cut %d bytes (1 damaged record, nothing intact after it) after seq %d: %s",
            self.log_name, bytes_cut, damage.seq - 1, reason,
        )  # fmt: skip
        return bytes_cut, reason

    def _intact_record_after(
        self, seg: _Segment, damage: _Damage, size: int
    ) -> tuple[int, int] | None:
        """(seq, offset) of a valid header after the damage, which a torn write cannot leave."""
        start = damage.offset + 1
        try:  # a damaged payload behind a good header: skip it, its bytes may look like records
            peek = os.pread(self._fd_of(seg), _HEADER_PEEK_BYTES, damage.offset)
            start = damage.offset + parse_header(peek).record_bytes
        except (TruncatedRecord, CorruptRecord):
            pass
        while start < size:
            chunk = os.pread(self._fd_of(seg), _SCAN_CHUNK_BYTES + _HEADER_PEEK_BYTES, start)
            hit = chunk.find(MAGIC)
            while 0 <= hit < _SCAN_CHUNK_BYTES:
                try:
                    seq, _ = decode_header(chunk, hit)
                except (TruncatedRecord, CorruptRecord):
                    seq = -1
                if seq >= damage.seq:
                    return seq, start + hit
                hit = chunk.find(MAGIC, hit + 1)
            start += _SCAN_CHUNK_BYTES
        return None


def _older_header(data: bytes, seg: _Segment) -> bool:
    """A valid header of an older segment: a reused file whose new header a power loss
    lost (its rename was durable, the header write was not)."""
    magic, version, _, first_seq, crc = _SEGMENT_HEADER.unpack(data)
    return bool(
        magic == SEGMENT_MAGIC
        and version == SEGMENT_VERSION
        and crc == crc32c(data[:-4])
        and first_seq < seg.first_seq
    )


def _holds_records(first_seq: int, path: Path) -> bool:
    """Whether the segment file starts with its own first record (a reused one may hold
    an older segment's records only)."""
    with path.open("rb") as f:
        f.seek(SEGMENT_HEADER_BYTES)
        peek = f.read(_HEADER_PEEK_BYTES)
    try:
        seq, _ = decode_header(peek)
    except (TruncatedRecord, CorruptRecord):
        return False
    return seq == first_seq


def _check_blob(blob: BytesLike, first_seq: int, count: int) -> list[int]:
    """Sizes of the `count` records of a batch, every one fully checked; else CorruptRecord."""
    sizes: list[int] = []
    pos = 0
    try:
        while pos < len(blob) and len(sizes) < count:
            seq, end = check_record(blob, pos)
            expected = first_seq + len(sizes)
            if seq != expected:
                raise CorruptRecord(f"batch has seq {seq} at pos {pos}, expected {expected}")
            sizes.append(end - pos)
            pos = end
    except TruncatedRecord as exc:
        raise CorruptRecord(f"batch ends inside a record: {exc}") from None
    if len(sizes) != count or pos != len(blob):
        raise CorruptRecord(
            f"batch of {len(blob)} bytes does not hold exactly the {count} records it says"
        )
    return sizes
