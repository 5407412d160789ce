"""MasterJournal on real files: the primary's write hooks, tail check, full journal, group commit.

A "kill" here is what SIGKILL leaves: the segment files as they are on disk (the page cache
survives), read by a new JournalStore; anything held only in the old process's memory is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.bitmap import DifferenceBitmap
from common.journal.record import FLAG_BASE, Entry, Op, iter_records
from common.journal.store import SEGMENT_HEADER_BYTES, JournalStore, SyncTicket
from common.marklog import MarkLog
from common.volume import Volume
from primaryd.master import MasterJournal, Mode

KiB = 1 << 10
MiB = 1 << 20
VOLUME_BYTES = 1 * MiB
NAMES = ("vol0", "vol1")
REGION_BYTES = 4 * KiB
CAPACITY_BYTES = 16 * MiB


@dataclass
class Primary:
    """The primary's journal, volumes and bitmaps, wired as primaryd wires them."""

    data_dir: Path
    store: JournalStore
    volumes: dict[str, Volume]
    bitmaps: dict[str, DifferenceBitmap]
    master: MasterJournal = field(init=False)
    full_calls: int = 0
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        marks = MarkLog(self.data_dir, self.bitmaps)
        self.master = MasterJournal(
            self.store, self.volumes, self.bitmaps, self._on_full, marks, self._on_failed
        )

    def _on_full(self) -> None:
        self.full_calls += 1
        self.master.mode = Mode.BITMAP  # as the group does when it suspends the pair (PFUS)

    def _on_failed(self, why: str) -> None:
        self.failures.append(why)
        self.master.mode = Mode.BITMAP  # as the group does when it suspends the pair (PSUE)
        self.store.reset(self.store.next_seq)

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"


@contextlib.contextmanager
def opened_primary(
    data_dir: Path,
    *,
    mode: Mode = Mode.JOURNAL,
    volume_bytes: int = VOLUME_BYTES,
    capacity_bytes: int = CAPACITY_BYTES,
    segment_bytes: int | None = None,
    store_cls: type[JournalStore] = JournalStore,
) -> Iterator[Primary]:
    store, _ = store_cls.open(data_dir / "journal", capacity_bytes, segment_bytes)
    volumes: dict[str, Volume] = {}
    try:
        for name in NAMES:
            volumes[name] = Volume.open_or_create(name, data_dir / f"{name}.img", volume_bytes)
        bitmaps = {name: DifferenceBitmap(volume_bytes, REGION_BYTES) for name in NAMES}
        primary = Primary(data_dir, store, volumes, bitmaps)
        primary.master.mode = mode
        yield primary
    finally:
        store.close()
        for volume in volumes.values():
            volume.close()


@contextlib.contextmanager
def killed_and_restarted(old: Primary, **kwargs: Any) -> Iterator[Primary]:
    """A new primary over the files `old` left, opened before `old` is closed (closing it
    would write out its pending tail, which a SIGKILL loses)."""
    with opened_primary(old.data_dir, **kwargs) as new:
        yield new


def records_on_disk(journal_dir: Path) -> list[Entry]:
    """Every record in the segment files, decoded from the bytes on disk."""
    entries: list[Entry] = []
    for path in sorted(journal_dir.glob("*.seg")):
        entries.extend(iter_records(path.read_bytes()[SEGMENT_HEADER_BYTES:]))
    return entries


def fields(entry: Entry) -> tuple[str, Op, int, int, bytes, int]:
    return entry.volume, entry.op, entry.offset, entry.length, bytes(entry.payload), entry.flags


def dirty_offsets(bitmap: DifferenceBitmap) -> list[int]:
    return [
        offset for offset in range(0, bitmap.volume_size, REGION_BYTES) if bitmap.is_marked(offset)
    ]


Request = tuple[str, Op, int, int, bytes]  # volume, op, offset, length, payload


def random_requests(rng: random.Random, count: int) -> list[Request]:
    requests: list[Request] = []
    for _ in range(count):
        op = rng.choice(list(Op))
        offset = rng.randrange(0, VOLUME_BYTES, 512)
        length = rng.randrange(512, min(16 * KiB, VOLUME_BYTES - offset) + 1, 512)
        payload = rng.randbytes(length) if op is Op.WRITE else b""
        requests.append((rng.choice(NAMES), op, offset, length, payload))
    return requests


def journal_request(master: MasterJournal, request: Request) -> None:
    """What the NBD server calls for a batch of one request, before its volume write."""
    volume, op, offset, length, payload = request
    if op is Op.WRITE:
        master.wrote(volume, offset, payload)
    elif op is Op.TRIM:
        master.trimmed(volume, offset, length)
    else:
        master.zeroed(volume, offset, length)
    master.flush_records()


def do_volume_write(volumes: dict[str, Volume], request: Request) -> None:
    volume, op, offset, length, payload = request
    if op is Op.WRITE:
        volumes[volume].write(offset, payload)
    elif op is Op.TRIM:
        volumes[volume].punch(offset, length)
    else:
        volumes[volume].zero(offset, length, allocate=False)


# -- the write hooks ----------------------------------------------------------------------


def test_journal_mode_appends_consecutive_records_of_each_request(tmp_path: Path) -> None:
    requests = random_requests(random.Random(3), 60)
    with opened_primary(tmp_path, segment_bytes=16 * KiB) as p:
        for request in requests:
            journal_request(p.master, request)
        entries = p.store.entries(1, 1000, 64 * MiB)
        assert [entry.seq for entry in entries] == list(range(1, len(requests) + 1))
        assert [fields(entry) for entry in entries] == [(*r, 0) for r in requests]
        assert p.master.records_appended == len(requests)
        assert p.store.segment_count > 1  # the records span segment rolls
        assert all(bitmap.dirty_regions == 0 for bitmap in p.bitmaps.values())


def test_each_record_is_in_the_segment_file_after_flush_records(tmp_path: Path) -> None:
    requests = random_requests(random.Random(4), 40)
    with opened_primary(tmp_path, segment_bytes=16 * KiB) as p:
        for seq, request in enumerate(requests, start=1):
            journal_request(p.master, request)
            on_disk = records_on_disk(p.journal_dir)  # what a SIGKILL now leaves
            assert len(on_disk) == seq
            assert (on_disk[-1].seq, *fields(on_disk[-1])) == (seq, *request, 0)
            if request[1] is Op.WRITE:
                segment = max(p.journal_dir.glob("*.seg"))
                assert request[4] in segment.read_bytes()


def test_mode_off_journals_and_marks_nothing(tmp_path: Path) -> None:
    with opened_primary(tmp_path, mode=Mode.OFF) as p:
        for request in random_requests(random.Random(5), 20):
            journal_request(p.master, request)
        assert p.store.last_seq == 0
        assert p.master.records_appended == 0
        assert records_on_disk(p.journal_dir) == []
        assert all(bitmap.dirty_regions == 0 for bitmap in p.bitmaps.values())


def test_mode_bitmap_marks_the_regions_and_journals_nothing(tmp_path: Path) -> None:
    with opened_primary(tmp_path, mode=Mode.BITMAP) as p:
        p.master.wrote("vol0", 5 * REGION_BYTES + 100, b"x" * REGION_BYTES)  # spans two
        p.master.trimmed("vol1", 40 * REGION_BYTES, 3 * REGION_BYTES)
        p.master.zeroed("vol0", 80 * REGION_BYTES, 1)
        assert dirty_offsets(p.bitmaps["vol0"]) == [
            5 * REGION_BYTES,
            6 * REGION_BYTES,
            80 * REGION_BYTES,
        ]
        assert dirty_offsets(p.bitmaps["vol1"]) == [
            40 * REGION_BYTES,
            41 * REGION_BYTES,
            42 * REGION_BYTES,
        ]
        assert p.store.last_seq == 0
        assert records_on_disk(p.journal_dir) == []


# -- check_tail after a kill ----------------------------------------------------------------


def test_check_tail_of_an_empty_journal_is_true(tmp_path: Path) -> None:
    with opened_primary(tmp_path) as p:
        assert p.master.check_tail() is True
        assert p.store.last_seq == 0


@pytest.mark.parametrize("op", list(Op))
def test_check_tail_is_true_when_the_last_record_reached_the_volume(tmp_path: Path, op: Op) -> None:
    earlier: Request = ("vol1", Op.WRITE, 64 * KiB, 8 * KiB, b"\x11" * 8 * KiB)
    last: Request = ("vol1", op, 68 * KiB, 8 * KiB, b"\x22" * 8 * KiB if op is Op.WRITE else b"")
    with opened_primary(tmp_path) as old:
        for request in (earlier, last):
            journal_request(old.master, request)
            do_volume_write(old.volumes, request)
        with killed_and_restarted(old) as p:
            assert p.master.check_tail() is True
            assert p.store.last_seq == 2
            assert len(records_on_disk(p.journal_dir)) == 2


def test_check_tail_rejournals_a_write_that_never_reached_the_volume(tmp_path: Path) -> None:
    before: Request = ("vol0", Op.WRITE, 12 * KiB, 8 * KiB, random.Random(1).randbytes(8 * KiB))
    lost: Request = ("vol0", Op.WRITE, 16 * KiB, 8 * KiB, b"\x77" * 8 * KiB)
    with opened_primary(tmp_path) as old:
        journal_request(old.master, before)
        do_volume_write(old.volumes, before)
        journal_request(old.master, lost)  # killed before its volume write
        with killed_and_restarted(old) as p:
            actual = p.volumes["vol0"].read(16 * KiB, 8 * KiB)
            assert actual == before[4][4 * KiB :] + bytes(4 * KiB)
            assert p.master.check_tail() is False
            base = records_on_disk(p.journal_dir)[-1]  # in the file, not only in memory
            assert base.seq == 3
            assert fields(base) == ("vol0", Op.WRITE, 16 * KiB, 8 * KiB, actual, FLAG_BASE)
            assert p.master.check_tail() is True  # the tail now says what the volume holds
            assert p.store.last_seq == 3


@pytest.mark.parametrize("op", [Op.TRIM, Op.ZERO])
def test_check_tail_rejournals_a_trim_or_zero_that_never_reached_the_volume(
    tmp_path: Path, op: Op
) -> None:
    data: Request = ("vol1", Op.WRITE, 100 * KiB, 16 * KiB, random.Random(2).randbytes(16 * KiB))
    lost: Request = ("vol1", op, 96 * KiB, 32 * KiB, b"")
    with opened_primary(tmp_path) as old:
        journal_request(old.master, data)
        do_volume_write(old.volumes, data)
        journal_request(old.master, lost)  # killed before the punch
        with killed_and_restarted(old) as p:
            assert p.master.check_tail() is False
            base = records_on_disk(p.journal_dir)[-1]
            expected = bytes(4 * KiB) + data[4] + bytes(12 * KiB)
            assert (base.seq, *fields(base)) == (
                3,
                "vol1",
                Op.WRITE,
                96 * KiB,
                32 * KiB,
                expected,
                FLAG_BASE,
            )


def test_check_tail_of_a_large_trim_reads_the_volume_piecewise(tmp_path: Path) -> None:
    volume_bytes = 64 * MiB
    trim: Request = ("vol0", Op.TRIM, 0, volume_bytes, b"")
    with opened_primary(tmp_path, volume_bytes=volume_bytes) as old:
        journal_request(old.master, trim)
        do_volume_write(old.volumes, trim)
        with killed_and_restarted(old, volume_bytes=volume_bytes) as p:
            tracemalloc.start()
            try:
                assert p.master.check_tail() is True
                _, peak_bytes = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak_bytes < 8 * MiB  # not the 64 MiB region at once
            assert p.store.last_seq == 1


def test_check_tail_rejournals_a_large_trim_that_never_reached_the_volume(
    tmp_path: Path,
) -> None:
    volume_bytes = 64 * MiB
    data: Request = ("vol0", Op.WRITE, 40 * MiB, 4 * KiB, b"\x5a" * 4 * KiB)
    lost: Request = ("vol0", Op.TRIM, 0, volume_bytes, b"")  # one NBD TRIM of the volume
    with opened_primary(tmp_path, volume_bytes=volume_bytes, capacity_bytes=1 << 30) as old:
        journal_request(old.master, data)
        do_volume_write(old.volumes, data)
        journal_request(old.master, lost)  # killed before the punch
        with killed_and_restarted(old, volume_bytes=volume_bytes, capacity_bytes=1 << 30) as p:
            assert p.master.check_tail() is False
            # The data the TRIM did not remove is journaled again after it, or marked dirty.
            replayed = bytearray(volume_bytes)
            for entry in p.store.entries(3, 1000, 64 * MiB):
                if entry.op is Op.WRITE:
                    replayed[entry.offset : entry.offset + entry.length] = entry.payload
            in_journal = replayed[40 * MiB : 40 * MiB + 4 * KiB] == data[4]
            assert in_journal or p.bitmaps["vol0"].is_marked(40 * MiB)


# -- a full journal -------------------------------------------------------------------------


def test_a_full_journal_suspends_once_and_marks_the_bitmap_instead(tmp_path: Path) -> None:
    with opened_primary(tmp_path, capacity_bytes=4 * KiB, segment_bytes=4 * KiB) as p:
        offsets = [i * 2 * REGION_BYTES for i in range(8)]
        for offset in offsets:
            p.master.wrote("vol0", offset, b"\xee" * 1000)  # never raises
        p.master.trimmed("vol1", 0, REGION_BYTES)
        p.master.zeroed("vol1", 8 * REGION_BYTES, REGION_BYTES)
        assert p.full_calls == 1
        journaled = p.store.last_seq
        assert 0 < journaled < len(offsets)
        p.master.flush_records()
        assert [entry.offset for entry in records_on_disk(p.journal_dir)] == offsets[:journaled]
        assert dirty_offsets(p.bitmaps["vol0"]) == offsets[journaled:]
        assert dirty_offsets(p.bitmaps["vol1"]) == [0, 8 * REGION_BYTES]


# -- group commit -------------------------------------------------------------------------


class CountingStore(JournalStore):
    """A real store that keeps every sync ticket it hands out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tickets: list[SyncTicket] = []

    def prepare_sync(self) -> SyncTicket:
        ticket = super().prepare_sync()
        self.tickets.append(ticket)
        return ticket


@pytest.mark.asyncio
async def test_concurrent_syncs_share_one_fdatasync(tmp_path: Path) -> None:
    with opened_primary(tmp_path, store_cls=CountingStore) as p:
        assert isinstance(p.store, CountingStore)
        p.master.wrote("vol0", 0, b"\x01" * 4 * KiB)
        async with asyncio.timeout(2):
            await asyncio.gather(*(p.master.sync() for _ in range(20)))
        assert 1 <= len(p.store.tickets) <= 2
        assert all(ticket.succeeded for ticket in p.store.tickets)


@pytest.mark.asyncio
async def test_syncs_complete_while_host_writes_continue(tmp_path: Path) -> None:
    with opened_primary(tmp_path, segment_bytes=64 * KiB, store_cls=CountingStore) as p:
        assert isinstance(p.store, CountingStore)
        writes = 120
        durable_upto: list[int] = []

        async def host() -> None:
            for i in range(writes):
                p.master.wrote(NAMES[i % 2], (i % 200) * 4 * KiB, bytes([i]) * 4 * KiB)
                await asyncio.sleep(0.001 if i % 4 == 0 else 0)

        async def flusher(host_task: asyncio.Task[None]) -> None:
            while not host_task.done():
                upto = p.store.last_seq
                await asyncio.gather(p.master.sync(), p.master.sync())  # a FLUSH and a FUA
                durable_upto.append(upto)

        async with asyncio.timeout(2):
            host_task = asyncio.create_task(host())
            await asyncio.gather(host_task, flusher(host_task))
            await p.master.sync()
        assert len(durable_upto) >= 2  # syncs completed while writes went on
        assert len(p.store.tickets) <= 2 * len(durable_upto) + 1
        assert all(ticket.succeeded for ticket in p.store.tickets)
        synced = {seg.path for ticket in p.store.tickets for seg in ticket.segments}
        assert set(p.journal_dir.glob("*.seg")) <= synced  # every segment was fdatasynced
        assert any(ticket.syncs_dir for ticket in p.store.tickets)  # and the new names
        assert p.store.pending_bytes == 0
        assert len(records_on_disk(p.journal_dir)) == writes


# -- the read-journal long poll -------------------------------------------------------------


@pytest.mark.asyncio
async def test_wait_for_records_returns_at_once_when_a_newer_record_exists(
    tmp_path: Path,
) -> None:
    with opened_primary(tmp_path) as p:
        p.master.wrote("vol0", 0, b"\x01" * 512)
        started = time.monotonic()
        await asyncio.wait_for(p.master.wait_for_records(0, timeout_s=5.0), 0.2)
        assert time.monotonic() - started < 0.1


@pytest.mark.asyncio
async def test_wait_for_records_wakes_every_waiter_on_append(tmp_path: Path) -> None:
    with opened_primary(tmp_path) as p:
        p.master.wrote("vol0", 0, b"\x01" * 512)
        waiters = [
            asyncio.create_task(p.master.wait_for_records(1, timeout_s=5.0)) for _ in range(3)
        ]
        await asyncio.sleep(0.02)
        assert not any(waiter.done() for waiter in waiters)
        p.master.zeroed("vol1", 0, 512)
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*waiters), 0.2)
        assert time.monotonic() - started < 0.1


@pytest.mark.asyncio
async def test_wait_for_records_times_out_then_still_wakes_a_later_waiter(
    tmp_path: Path,
) -> None:
    with opened_primary(tmp_path) as p:
        started = time.monotonic()
        await p.master.wait_for_records(0, timeout_s=0.05)
        assert 0.04 <= time.monotonic() - started < 0.2
        waiter = asyncio.create_task(p.master.wait_for_records(0, timeout_s=5.0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        p.master.trimmed("vol0", 0, 4 * KiB)
        await asyncio.wait_for(waiter, 0.2)


@pytest.mark.asyncio
async def test_wait_for_records_is_not_woken_by_bitmap_marks(tmp_path: Path) -> None:
    with opened_primary(tmp_path, mode=Mode.BITMAP) as p:
        waiter = asyncio.create_task(p.master.wait_for_records(0, timeout_s=0.1))
        await asyncio.sleep(0.01)
        p.master.wrote("vol0", 0, b"\x01" * 512)
        await asyncio.sleep(0.02)
        assert not waiter.done()
        await asyncio.wait_for(waiter, 0.2)  # then times out as asked
        assert p.store.last_seq == 0


def test_check_tail_finds_every_write_of_a_killed_batch_newest_record_winning(
    tmp_path: Path,
) -> None:
    """A batch is journaled, then its volume writes start and the kill comes after some of
    them: every region whose newest record is not on the volume is journaled again with
    the volume's actual content, and only those."""
    first: Request = ("vol0", Op.WRITE, 0, 4 * KiB, b"\x01" * 4 * KiB)
    overwritten: Request = ("vol0", Op.WRITE, 0, 4 * KiB, b"\x02" * 4 * KiB)
    done: Request = ("vol1", Op.WRITE, 8 * KiB, 4 * KiB, b"\x03" * 4 * KiB)
    lost: Request = ("vol1", Op.WRITE, 64 * KiB, 4 * KiB, b"\x04" * 4 * KiB)
    batch = [first, overwritten, done, lost]
    with opened_primary(tmp_path) as old:
        for request in batch:
            volume, _op, offset, _length, payload = request
            old.master.wrote(volume, offset, payload)
        old.master.flush_records()
        for request in (first, done):  # the kill: `overwritten` and `lost` never applied
            do_volume_write(old.volumes, request)
    with opened_primary(tmp_path) as p:
        assert p.master.check_tail() is False
        rebased = [e for e in p.store.entries(5, 10, 1 << 20)]
        assert sorted((e.volume, e.offset, e.op, bytes(e.payload[:1])) for e in rebased) == [
            ("vol0", 0, Op.WRITE, b"\x01"),  # the volume's actual content, not the newest record
            ("vol1", 64 * KiB, Op.TRIM, b""),  # still zeros there: sent as a hole
        ]
        assert all(e.flags == FLAG_BASE for e in rebased)


# -- base references: the copy's data is read from the P-VOL when it is sent ------------------


def _sent(primary: Primary, from_seq: int = 1, max_bytes: int = 64 * MiB) -> list[Entry]:
    blob, count = primary.master.read(from_seq, 10_000, max_bytes)
    entries = list(iter_records(blob))  # full records, crcs checked: what the wire carries
    assert len(entries) == count
    return entries


def test_a_base_reference_journals_no_data_and_is_sent_with_the_volume_content(
    tmp_path: Path,
) -> None:
    with opened_primary(tmp_path) as primary:
        primary.volumes["vol0"].write(64 * KiB, b"\x5a" * (64 * KiB))
        assert primary.master.append_base_ref("vol0", 64 * KiB, 64 * KiB)
        primary.master.flush_records()
        assert primary.store.used_bytes < 4 * KiB  # a header and a name, no payload

        (entry,) = _sent(primary)
        assert (entry.op, entry.flags, entry.offset, entry.length) == (
            Op.WRITE,
            FLAG_BASE,
            64 * KiB,
            64 * KiB,
        )
        assert bytes(entry.payload) == b"\x5a" * (64 * KiB)


def test_a_reference_sent_after_a_host_write_carries_the_newer_data(tmp_path: Path) -> None:
    with opened_primary(tmp_path) as primary:
        volume = primary.volumes["vol0"]
        volume.write(0, b"\x01" * (8 * KiB))
        primary.master.append_base_ref("vol0", 0, 8 * KiB)
        primary.master.wrote("vol0", 4 * KiB, b"\x02" * (4 * KiB))  # after the ref's seq
        volume.write(4 * KiB, b"\x02" * (4 * KiB))
        primary.master.flush_records()

        base, host = _sent(primary)
        assert bytes(base.payload) == b"\x01" * (4 * KiB) + b"\x02" * (4 * KiB)
        assert (host.seq, host.flags, bytes(host.payload)) == (2, 0, b"\x02" * (4 * KiB))
        # The S-VOLs hold host write 2's bytes once the base is applied: consistent from 2 on.
        assert primary.master.ref_horizon_seq == 2


def test_a_reference_to_zeros_is_sent_as_a_base_trim(tmp_path: Path) -> None:
    with opened_primary(tmp_path) as primary:
        primary.volumes["vol1"].write(0, bytes(32 * KiB))  # allocated, all zeros
        primary.master.append_base_ref("vol1", 0, 32 * KiB)
        primary.master.flush_records()

        (entry,) = _sent(primary)
        assert (entry.op, entry.flags, entry.length, len(entry.payload)) == (
            Op.TRIM,
            FLAG_BASE,
            32 * KiB,
            0,
        )


def test_filled_in_references_stay_within_max_bytes(tmp_path: Path) -> None:
    with opened_primary(tmp_path) as primary:
        primary.volumes["vol0"].write(0, b"\x07" * VOLUME_BYTES)
        for offset in range(0, VOLUME_BYTES, 64 * KiB):
            primary.master.append_base_ref("vol0", offset, 64 * KiB)
        primary.master.flush_records()

        first = _sent(primary, max_bytes=200 * KiB)
        assert len(first) == 3  # 3 x (64 KiB + header) fit, a 4th would not
        assert len(_sent(primary, max_bytes=1)) == 1  # one record always goes
        rest = _sent(primary, from_seq=4)
        assert [e.seq for e in rest] == list(range(4, 17))
        assert all(bytes(e.payload) == b"\x07" * (64 * KiB) for e in first + rest)


def test_host_records_are_sent_as_journaled_when_no_reference_is_in_range(
    tmp_path: Path,
) -> None:
    with opened_primary(tmp_path) as primary:
        primary.master.wrote("vol0", 0, b"\x03" * (4 * KiB))
        primary.master.flush_records()
        blob, count = primary.master.read(1, 100, 64 * MiB)
        assert count == 1
        assert blob == primary.store.read(1, 100, 64 * MiB)[0]


def test_check_tail_takes_a_reference_as_holding_what_the_volume_holds(tmp_path: Path) -> None:
    with opened_primary(tmp_path) as primary:
        primary.master.append_base_ref("vol0", 0, 64 * KiB)
        primary.master.flush_records()
        assert primary.master.check_tail()
        assert primary.store.last_seq == 1  # nothing journaled again


def test_references_recovered_after_a_kill_are_still_filled_in(tmp_path: Path) -> None:
    with opened_primary(tmp_path) as primary:
        primary.volumes["vol0"].write(0, b"\x11" * (64 * KiB))
        primary.master.append_base_ref("vol0", 0, 64 * KiB)
        primary.master.flush_records()
    with opened_primary(tmp_path) as restarted:  # what a SIGKILL leaves: the files
        (entry,) = _sent(restarted)
        assert (entry.flags, bytes(entry.payload)) == (FLAG_BASE, b"\x11" * (64 * KiB))


class FullDiskStore(JournalStore):
    """A real store whose file writes fail with ENOSPC once `disk_full` is set (the e2e test
    test_pair_disk_faults.py fills a real tmpfs; this pins the master journal's part)."""

    disk_full = False

    def write_pending(self) -> int:
        if self.disk_full and self.pending_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_pending()


def test_a_journal_disk_error_never_reaches_the_host_and_marks_the_writes(
    tmp_path: Path,
) -> None:
    with opened_primary(tmp_path, segment_bytes=64 * KiB, store_cls=FullDiskStore) as p:
        assert isinstance(p.store, FullDiskStore)
        p.master.wrote("vol0", 0, b"a" * 4096)
        p.master.flush_records()
        p.store.disk_full = True
        p.master.wrote("vol0", 8 * KiB, b"b" * 4096)
        p.master.flush_records()  # fails inside: the group is told, the host is not
        assert len(p.failures) == 1 and "No space left on device" in p.failures[0]
        assert p.master.mode is Mode.BITMAP
        for i in range(40):  # rolls segments: appends would write, and fail, if journaled
            p.master.wrote("vol1", i * 16 * KiB, b"c" * 16 * KiB)
            p.master.flush_records()
        assert len(p.failures) == 1, "told once"
        assert p.bitmaps["vol1"].dirty_bytes == 40 * 16 * KiB
