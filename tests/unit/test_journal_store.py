"""JournalStore on real files: ranges across segments, release, capacity, recovery, sync."""

import os
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.journal.record import CorruptRecord, Op, encode_record, iter_records
from common.journal.store import (
    INDEX_STRIDE,
    OPEN_SEGMENTS_MAX,
    SEGMENT_HEADER_BYTES,
    JournalCorrupt,
    JournalFull,
    JournalStore,
    segment_name,
)

KiB = 1 << 10
MiB = 1 << 20
SEGMENT_BYTES = 4 * KiB  # the smallest allowed: many rolls with few records


def rec(seq: int, size: int = 200, volume: str = "vol0") -> bytes:
    """A WRITE record whose payload and timestamp depend on its seq."""
    payload = (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]
    return encode_record(seq, volume, Op.WRITE, seq * 4096, size, payload, 1000 + seq)


def fill(store: JournalStore, count: int, size: int = 200) -> list[bytes]:
    records = []
    for _ in range(count):
        record = rec(store.next_seq, size)
        store.append(store.next_seq, record)
        records.append(record)
    return records


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".seg")


def spare_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".spare")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def store(jdir: Path) -> Iterator[JournalStore]:
    s, _ = JournalStore.open(jdir, 1 * MiB, SEGMENT_BYTES)
    yield s
    s.close()


def read_all(store: JournalStore, from_seq: int, max_entries: int, max_bytes: int) -> bytes:
    parts, seq = [], from_seq
    while seq < store.next_seq:
        blob, count = store.read(seq, max_entries, max_bytes)
        assert 1 <= count <= max_entries
        assert [e.seq for e in iter_records(blob)] == list(range(seq, seq + count))
        parts.append(blob)
        seq += count
    return b"".join(parts)


def test_append_and_read_ranges_across_segment_rolls(store: JournalStore, jdir: Path) -> None:
    records = fill(store, 100)
    assert (store.first_seq, store.last_seq, store.next_seq) == (1, 100, 101)
    assert store.segment_count > 5
    names = segment_files(jdir)
    assert names[0] == segment_name(1) and len(names) == store.segment_count
    for max_entries, max_bytes in [(1, MiB), (7, MiB), (1000, 1000), (1000, MiB), (3, 1)]:
        assert read_all(store, 1, max_entries, max_bytes) == b"".join(records)
    assert store.used_bytes == sum((jdir / n).stat().st_size for n in names) + store.pending_bytes
    store.write_pending()
    assert store.pending_bytes == 0
    assert store.used_bytes == sum((jdir / n).stat().st_size for n in names)
    assert read_all(store, 1, 13, 3000) == b"".join(records)


@pytest.mark.parametrize(("count", "size"), [(1000, 100), (300, 20 * KiB)])
def test_read_from_the_middle_uses_the_sparse_index(jdir: Path, count: int, size: int) -> None:
    s, _ = JournalStore.open(jdir, 64 * MiB, 4 * MiB)
    records = fill(s, count, size)
    s.close()
    s, _ = JournalStore.open(jdir, 64 * MiB, 4 * MiB)  # no cursor, nothing pending
    try:
        assert s.segment_count == (1 if size < KiB else 2)
        some = [1, 2, 63, 64, 65, 129, count - 1, count, *random.sample(range(1, count), 40)]
        for seq in some:
            blob, got = s.read(seq, 5, MiB)
            assert got == min(5, count + 1 - seq)
            assert blob == b"".join(records[seq - 1 : seq - 1 + got])
            assert s.timestamp_ns_of(seq) == 1000 + seq
    finally:
        s.close()


def test_read_limits(store: JournalStore) -> None:
    records = fill(store, 3, size=1000)
    assert store.read(1, 10, 10) == (records[0], 1)  # one record even over max_bytes
    assert store.read(1, 10, len(records[0]) * 2) == (records[0] + records[1], 2)
    assert store.read(2, 1, MiB) == (records[1], 1)
    assert store.read(4, 10, MiB) == (b"", 0)
    with pytest.raises(ValueError, match="not held"):
        store.read(5, 10, MiB)
    with pytest.raises(ValueError, match="not held"):
        store.read(0, 10, MiB)
    assert [e.seq for e in store.entries(2, 10, MiB)] == [2, 3]


def test_reads_see_pending_written_and_half_written_tails(jdir: Path) -> None:
    s, _ = JournalStore.open(jdir, MiB, 64 * KiB, pending_bytes_max=1500)
    try:
        records = fill(s, 5, size=300)  # 1500 bytes pending max: some written, some pending
        assert 0 < s.pending_bytes < sum(map(len, records))
        assert read_all(s, 1, 10, MiB) == b"".join(records)
        assert read_all(s, 3, 10, MiB) == b"".join(records[2:])
    finally:
        s.close()


def test_sequential_reader_follows_appends_and_rolls(store: JournalStore) -> None:
    records, seq = [], 1
    got = []
    for _ in range(50):
        records += fill(store, 3)
        while seq < store.next_seq:
            blob, count = store.read(seq, 2, MiB)
            got.append(blob)
            seq += count
    assert b"".join(got) == b"".join(records)


def test_release_frees_whole_segments_and_first_seq_advances(
    store: JournalStore, jdir: Path
) -> None:
    records = fill(store, 100)
    store.write_pending()
    names = segment_files(jdir)
    firsts = [int(n.removesuffix(".seg")) for n in names]
    upto = firsts[3] + 1  # inside the fourth segment
    sizes = sum((jdir / n).stat().st_size for n in names[:3])
    used = store.used_bytes
    assert store.release(upto) == sizes
    assert segment_files(jdir) == names[3:]
    assert store.first_seq == firsts[3]
    assert store.used_bytes == used - sizes
    assert read_all(store, firsts[3], 10, MiB) == b"".join(records[firsts[3] - 1 :])
    with pytest.raises(ValueError, match="not held"):
        store.read(firsts[3] - 1, 1, MiB)
    assert store.release(upto) == 0


def test_release_of_everything_keeps_the_position(store: JournalStore, jdir: Path) -> None:
    fill(store, 30)
    freed = store.release(10**9)  # beyond last_seq: clamped
    assert freed > 0
    assert (store.first_seq, store.next_seq) == (31, 31)
    assert store.used_bytes == SEGMENT_HEADER_BYTES == store.pending_bytes + SEGMENT_HEADER_BYTES
    assert segment_files(jdir) == [segment_name(31)]  # empty, named after the next append
    assert store.read(31, 10, MiB) == (b"", 0)
    records = fill(store, 2)
    assert store.read(31, 10, MiB) == (b"".join(records), 2)
    store.close()
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    s.close()
    assert (report.first_seq, report.last_seq, report.records) == (31, 32, 2)


def test_release_drops_the_active_segment_with_its_pending_tail(
    store: JournalStore, jdir: Path
) -> None:
    fill(store, 3)  # all in one segment, all pending
    assert store.pending_bytes > 0
    store.release(3)
    assert (store.pending_bytes, store.first_seq, store.next_seq) == (0, 4, 4)
    assert segment_files(jdir) == [segment_name(4)]


def test_journal_full_leaves_the_store_unchanged_and_accepts_after_release(jdir: Path) -> None:
    s, _ = JournalStore.open(jdir, 16 * KiB, SEGMENT_BYTES)
    try:
        with pytest.raises(JournalFull, match="full"):
            while True:
                fill(s, 1, size=500)
        before = (s.first_seq, s.next_seq, s.used_bytes, s.pending_bytes, segment_files(jdir))
        blob, count = s.read(s.first_seq, 1000, MiB)
        with pytest.raises(JournalFull):
            s.append(s.next_seq, rec(s.next_seq, 500))
        other, _ = JournalStore.open(jdir.parent / "other", MiB)
        other.reset(s.next_seq)
        fill(other, 3, size=500)
        with pytest.raises(JournalFull):
            s.append_blob(s.next_seq, other.read(s.next_seq, 3, MiB)[0], 3)
        other.close()
        assert (s.first_seq, s.next_seq, s.used_bytes, s.pending_bytes, segment_files(jdir)) == (
            before
        )
        assert s.read(s.first_seq, 1000, MiB) == (blob, count)
        assert s.used_bytes <= s.capacity_bytes
        s.release(s.first_seq + 8)
        fill(s, 4, size=500)
    finally:
        s.close()


def test_reopen_after_close_recovers_first_and_last_seq(jdir: Path) -> None:
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    assert (report.first_seq, report.last_seq, report.records, report.segments) == (1, 0, 0, 0)
    records = fill(s, 60)
    s.release(20)
    first = s.first_seq
    s.close()
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    try:
        assert (report.first_seq, report.last_seq) == (first, 60)
        assert (report.records, report.bytes_cut, report.cut_reason) == (61 - first, 0, None)
        assert report.segments == s.segment_count
        assert read_all(s, first, 7, MiB) == b"".join(records[first - 1 :])
        fill(s, 1)
        assert s.last_seq == 61
    finally:
        s.close()


def make_journal(jdir: Path, count: int) -> list[bytes]:
    s, _ = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    records = fill(s, count, size=150)
    s.close()
    return records


def last_segment(directory: Path) -> Path:
    return directory / segment_files(directory)[-1]


def test_torn_tail_is_cut_at_any_position_and_appends_continue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = tmp_path / "base"
    records = make_journal(base, 40)
    tail = last_segment(base)
    first = int(tail.name.removesuffix(".seg"))
    size = tail.stat().st_size
    boundaries = {SEGMENT_HEADER_BYTES + sum(map(len, records[first - 1 : k])) for k in range(41)}
    for cut_at in range(SEGMENT_HEADER_BYTES, size, 7):
        jdir = tmp_path / f"cut{cut_at}"
        shutil.copytree(base, jdir)
        os.truncate(last_segment(jdir), cut_at)
        whole = max(b for b in boundaries if b <= cut_at)
        kept = first - 1 + sum(1 for b in boundaries if SEGMENT_HEADER_BYTES < b <= cut_at)
        caplog.clear()
        s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
        try:
            assert report.bytes_cut == cut_at - whole
            if cut_at != whole:
                assert report.cut_reason is not None and "torn record" in report.cut_reason
                assert f"cut {cut_at - whole} bytes" in caplog.text
            assert (report.last_seq, s.next_seq) == (kept, kept + 1)
            assert last_segment(jdir).stat().st_size == whole
            assert read_all(s, 1, 100, MiB) == b"".join(records[:kept])
            fill(s, 2, size=150)
            assert s.read(kept + 1, 100, MiB)[1] == 2
        finally:
            s.close()
        s, again = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
        s.close()
        assert (again.last_seq, again.bytes_cut) == (report.last_seq + 2, 0)


def test_zero_filled_tail_is_cut(jdir: Path) -> None:
    records = make_journal(jdir, 10)
    with open(last_segment(jdir), "ab") as f:
        f.write(bytes(5000))
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    s.close()
    assert (report.last_seq, report.bytes_cut) == (10, 5000)
    assert report.cut_reason is not None and "bad magic" in report.cut_reason
    assert len(records) == 10


def test_torn_tail_behind_an_empty_segment_is_cut_and_the_empty_one_removed(jdir: Path) -> None:
    records = make_journal(jdir, 30)
    tail = last_segment(jdir)
    os.truncate(tail, tail.stat().st_size - 10)  # lost on power failure: never synced...
    (jdir / segment_name(31)).write_bytes(b"")  # ...while the next segment's creation stuck
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    try:
        assert (report.last_seq, report.bytes_cut) == (29, len(records[-1]) - 10)
        assert report.cut_reason is not None and "no longer follows seq 29" in report.cut_reason
        assert segment_files(jdir)[-1] == tail.name
        fill(s, 1)
    finally:
        s.close()


def corrupt_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(data)


def test_corrupt_byte_in_a_non_last_segment_raises(jdir: Path) -> None:
    make_journal(jdir, 60)
    first = jdir / segment_files(jdir)[0]
    corrupt_byte(first, SEGMENT_HEADER_BYTES + 300)
    with pytest.raises(JournalCorrupt, match=rf"{first} offset \d+: .*not the last segment"):
        JournalStore.open(jdir, MiB, SEGMENT_BYTES)


def test_corrupt_record_followed_by_intact_records_is_not_a_torn_tail(jdir: Path) -> None:
    make_journal(jdir, 60)
    tail = last_segment(jdir)
    corrupt_byte(tail, SEGMENT_HEADER_BYTES + 60)  # the first record's payload
    size = tail.stat().st_size
    with pytest.raises(JournalCorrupt, match=r"intact record seq \d+ follows"):
        JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    assert tail.stat().st_size == size  # nothing was cut


def test_corrupt_last_record_is_cut(jdir: Path) -> None:
    records = make_journal(jdir, 60)
    tail = last_segment(jdir)
    corrupt_byte(tail, tail.stat().st_size - 5)
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    s.close()
    assert (report.last_seq, report.bytes_cut) == (59, len(records[-1]))
    assert report.cut_reason is not None and "payload crc mismatch at seq 60" in report.cut_reason


def test_seq_gap_between_segments_raises(jdir: Path) -> None:
    make_journal(jdir, 100)
    (jdir / segment_files(jdir)[1]).unlink()
    with pytest.raises(JournalCorrupt, match="seq gap"):
        JournalStore.open(jdir, MiB, SEGMENT_BYTES)


def test_bad_segment_header_raises_and_a_torn_last_one_is_rewritten(jdir: Path) -> None:
    make_journal(jdir, 60)
    corrupt_byte(jdir / segment_files(jdir)[1], 3)
    with pytest.raises(JournalCorrupt, match="bad segment header"):
        JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    shutil.rmtree(jdir)
    make_journal(jdir, 60)
    (jdir / segment_name(61)).write_bytes(b"JPS")  # crashed while creating it
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    try:
        assert report.last_seq == 60
        assert report.cut_reason == f"torn segment header of {segment_name(61)} rewritten"
        fill(s, 1)
    finally:
        s.close()
    assert (jdir / segment_name(61)).stat().st_size > SEGMENT_HEADER_BYTES


def test_stray_files_are_deleted_or_refused(jdir: Path) -> None:
    make_journal(jdir, 5)
    (jdir / "state.tmp").write_bytes(b"half")
    s, _ = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    s.close()
    assert not (jdir / "state.tmp").exists()
    (jdir / "12.seg").write_bytes(b"")
    with pytest.raises(JournalCorrupt, match="unexpected segment file"):
        JournalStore.open(jdir, MiB, SEGMENT_BYTES)


def test_prepare_sync_runs_in_a_thread_while_appending(jdir: Path) -> None:
    fds_before = open_fds()
    s, _ = JournalStore.open(jdir, 4 * MiB, SEGMENT_BYTES)
    fill(s, 5)
    first = s.prepare_sync()
    assert first.syncs_dir  # the directory gained a segment
    assert s.pending_bytes == 0
    errors: list[BaseException] = []
    tickets = [first]

    def run_all() -> None:
        try:
            for ticket in tickets:
                ticket.run()
        except BaseException as exc:
            errors.append(exc)

    for _ in range(20):
        thread = threading.Thread(target=run_all)
        thread.start()
        fill(s, 30)  # rolls segments while the fdatasyncs run
        s.release(s.last_seq - 50)
        thread.join()
        assert not errors
        assert all(t.succeeded for t in tickets)
        tickets = [s.prepare_sync()]
    # A ticket not run yet is covered by the next one, so that one cannot finish early.
    unrun = s.prepare_sync()
    assert unrun.syncs_dir and unrun.segments
    unrun.close()
    s.prepare_sync().run()
    quiet = s.prepare_sync()
    quiet.run()
    assert quiet.succeeded and not quiet.syncs_dir
    s.close()
    tickets[0].close()
    assert open_fds() == fds_before


def test_append_blob_round_trips_what_another_store_read(tmp_path: Path) -> None:
    primary, _ = JournalStore.open(tmp_path / "p", 4 * MiB, SEGMENT_BYTES)
    secondary, _ = JournalStore.open(tmp_path / "s", 4 * MiB, 64 * KiB)
    try:
        records = fill(primary, 200, size=300)
        primary.release(50)
        secondary.reset(primary.first_seq)
        seq = primary.first_seq
        while seq < primary.next_seq:
            blob, count = primary.read(seq, 17, 4000)
            secondary.append_blob(seq, blob, count)
            seq += count
        assert secondary.next_seq == primary.next_seq
        expected = b"".join(records[primary.first_seq - 1 :])
        assert read_all(secondary, primary.first_seq, 1000, MiB) == expected
        assert [e.seq for e in secondary.entries(190, 100, MiB)] == list(range(190, 201))
    finally:
        primary.close()
        secondary.close()


def test_append_blob_refuses_a_bad_batch_whole(store: JournalStore) -> None:
    blob = rec(1) + rec(2) + rec(3)
    bad = bytearray(blob)
    bad[-1] ^= 1
    cases: list[tuple[bytes | bytearray, int]] = [
        (bad, 3),
        (blob, 2),
        (blob, 4),
        (blob[:-1], 3),
        (rec(1) + rec(3), 2),
    ]
    for batch, count in cases:
        with pytest.raises(CorruptRecord):
            store.append_blob(1, batch, count)
        assert (store.next_seq, store.used_bytes) == (1, 0)
    with pytest.raises(ValueError, match="expected 1"):
        store.append_blob(2, rec(2), 1)
    store.append_blob(1, blob, 3)
    assert store.read(1, 10, MiB) == (blob, 3)


def test_append_refuses_a_wrong_seq(store: JournalStore) -> None:
    with pytest.raises(ValueError, match="expected 1"):
        store.append(2, rec(2))
    with pytest.raises(ValueError, match="record says seq 2"):
        store.append(1, rec(2))
    assert store.next_seq == 1


def test_bytes_between_and_timestamp_ns_of(store: JournalStore) -> None:
    records = fill(store, 300, size=100)
    total = sum(map(len, records))
    assert store.bytes_between(1) == total
    assert store.bytes_between(301) == store.bytes_between(10**6) == 0
    for seq in [2, 40, 150, 299, 300]:
        exact = sum(map(len, records[seq - 1 :]))
        assert exact <= store.bytes_between(seq) <= exact + INDEX_STRIDE * len(records[0])
    assert store.timestamp_ns_of(150) == 1150
    assert store.timestamp_ns_of(0) is None and store.timestamp_ns_of(301) is None
    store.release(100)
    assert store.bytes_between(1) == store.bytes_between(store.first_seq)
    assert store.timestamp_ns_of(1) is None


def test_reset_drops_everything_and_moves_next_seq(store: JournalStore, jdir: Path) -> None:
    fill(store, 50)
    store.reset(1000)
    assert (store.first_seq, store.next_seq, store.used_bytes) == (1000, 1000, SEGMENT_HEADER_BYTES)
    assert segment_files(jdir) == [segment_name(1000)]
    with pytest.raises(ValueError):
        store.append(51, rec(51))
    records = fill(store, 3)
    assert store.read(1000, 10, MiB) == (b"".join(records), 3)


def test_a_record_bigger_than_a_segment_gets_its_own(store: JournalStore, jdir: Path) -> None:
    fill(store, 2)
    big = fill(store, 1, size=3 * SEGMENT_BYTES)[0]
    fill(store, 1)
    assert segment_files(jdir) == [segment_name(1), segment_name(3), segment_name(4)]
    assert store.read(3, 10, 100) == (big, 1)


def test_capacity_is_exact_for_append_and_append_blob(tmp_path: Path) -> None:
    size = (4096 - SEGMENT_HEADER_BYTES) // 4 - len(rec(1, 0))  # four records fill 4 KiB
    records = [rec(seq, size) for seq in range(1, 6)]
    for name in ("append", "append_blob"):
        s, _ = JournalStore.open(tmp_path / name, 4096, 4096)
        try:
            if name == "append":
                for seq, record in enumerate(records[:4], start=1):
                    s.append(seq, record)
            else:
                s.append_blob(1, b"".join(records[:4]), 4)
            assert s.used_bytes == s.capacity_bytes == 4096
            with pytest.raises(JournalFull):
                s.append(5, records[4])
        finally:
            s.close()


def test_damage_after_recovery_is_reported_by_reads(store: JournalStore, jdir: Path) -> None:
    fill(store, 10)
    store.write_pending()
    corrupt_byte(jdir / segment_name(1), SEGMENT_HEADER_BYTES + 100)  # first payload
    blob, _ = store.read(1, 1, MiB)  # headers are checked on read, payloads by decoders
    with pytest.raises(JournalCorrupt, match="payload crc mismatch at seq 1"):
        store.entries(1, 1, MiB)
    corrupt_byte(jdir / segment_name(1), SEGMENT_HEADER_BYTES + len(blob) + 13)  # 2nd header
    with pytest.raises(JournalCorrupt, match=rf"{segment_name(1)} offset {20 + len(blob)}"):
        store.read(1, 5, MiB)


def test_a_small_journal_gets_segments_that_fit(jdir: Path) -> None:
    s, _ = JournalStore.open(jdir, 64 * KiB)
    try:
        fill(s, 100)
        with pytest.raises(JournalFull):
            fill(s, 300)
        assert s.segment_count == 1 and s.used_bytes <= 64 * KiB
    finally:
        s.close()
    with pytest.raises(ValueError, match="at least"):
        JournalStore.open(jdir, 1000)


def test_pending_is_written_out_past_its_limit(jdir: Path) -> None:
    s, _ = JournalStore.open(jdir, 4 * MiB, MiB, pending_bytes_max=10 * KiB)
    try:
        fill(s, 100, size=1000)
        assert s.pending_bytes <= 10 * KiB
        assert s.write_pending() > 0 and s.write_pending() == 0
    finally:
        s.close()


def test_index_stays_small_for_200k_small_records(jdir: Path) -> None:
    s, _ = JournalStore.open(jdir, 256 * MiB)
    try:
        record_bytes = len(rec(1, size=16))
        for seq in range(1, 200_001):
            s.append(seq, rec(seq, size=16))
        assert s.index_entries <= 200_000 // INDEX_STRIDE + s.segment_count
        assert s.used_bytes == 200_000 * record_bytes + s.segment_count * SEGMENT_HEADER_BYTES
        assert s.read(123_457, 2, MiB) == (rec(123_457, 16) + rec(123_458, 16), 2)
    finally:
        s.close()


def test_open_fds_stay_bounded_over_many_segments(jdir: Path) -> None:
    fds_before = open_fds()
    make_journal(jdir, 3000)
    s, report = JournalStore.open(jdir, MiB, SEGMENT_BYTES)
    try:
        assert report.segments > OPEN_SEGMENTS_MAX * 2
        assert open_fds() - fds_before <= OPEN_SEGMENTS_MAX + 1
        assert len(read_all(s, 1, 50, MiB)) > 0
        assert open_fds() - fds_before <= OPEN_SEGMENTS_MAX + 1
    finally:
        s.close()
    assert open_fds() == fds_before


def test_iter_entries_walks_from_a_seq_to_the_end_in_chunks(store: JournalStore) -> None:
    fill(store, 5000, size=100)  # more than one 4096-record chunk
    assert [e.seq for e in store.iter_entries(4000)] == list(range(4000, 5001))
    assert [e.seq for e in store.iter_entries(0)][:2] == [1, 2]  # from before first_seq
    assert list(store.iter_entries(5001)) == []


# -- reused segment files -------------------------------------------------------------------


def _reopened(jdir: Path) -> JournalStore:
    """What a SIGKILL leaves (the files), opened again."""
    store, _ = JournalStore.open(jdir, 1 * MiB, SEGMENT_BYTES)
    return store


def test_released_segments_are_kept_as_spares_and_reused(store: JournalStore, jdir: Path) -> None:
    fill(store, 100)
    store.write_pending()
    store.release(store.last_seq - 1)
    kept = spare_files(jdir)
    assert 1 <= len(kept) == store.spare_count <= 4
    sizes = {name: (jdir / name).stat().st_size for name in kept}
    assert all(size > SEGMENT_BYTES // 2 for size in sizes.values())

    # Bigger records: each reused file keeps part of an older segment after its own.
    records = fill(store, 12, size=1000)
    store.write_pending()
    assert store.spare_count == 0 and spare_files(jdir) == []
    first, expected = store.first_seq, read_all(store, store.first_seq, 7, MiB)
    assert expected.endswith(b"".join(records))
    store.close()

    reopened = _reopened(jdir)  # non-last reused segments end where the next begins
    try:
        assert read_all(reopened, first, 7, MiB) == expected
    finally:
        reopened.close()


def test_a_reused_segment_recovers_its_own_records_not_the_stale_ones(
    store: JournalStore, jdir: Path
) -> None:
    fill(store, 100)
    store.write_pending()
    store.release(store.last_seq - 1)
    first = store.first_seq
    spares = store.spare_count
    records = fill(store, 30)  # the last segment reused: older records follow its own
    store.write_pending()
    assert store.spare_count < spares
    last = store.last_seq
    expected = read_all(store, first, 100, MiB)
    store.close()

    reopened = _reopened(jdir)
    try:
        assert (reopened.first_seq, reopened.last_seq) == (first, last)
        assert read_all(reopened, first, 100, MiB) == expected
        assert expected.endswith(b"".join(records))
        assert spare_files(jdir) == []  # a restart starts a new line of spares
        fill(reopened, 5)  # appends go on after the last own record
        reopened.write_pending()
    finally:
        reopened.close()
    again = _reopened(jdir)
    try:
        assert again.last_seq == last + 5
    finally:
        again.close()


def test_a_reused_segment_renamed_just_before_a_kill_holds_no_records(
    store: JournalStore, jdir: Path
) -> None:
    fill(store, 100)
    store.write_pending()
    store.release(store.last_seq - 1)
    spares = store.spare_count
    while store.spare_count == spares:  # until a roll took a spare: new header, rename
        store.append(store.next_seq, rec(store.next_seq))
    last = store.last_seq - 1  # the record that rolled is only pending
    store._pending.clear()  # killed before write_pending: it never reached the file
    store.close()

    reopened = _reopened(jdir)
    try:
        assert reopened.last_seq == last
        assert read_all(reopened, reopened.first_seq, 100, MiB)
    finally:
        reopened.close()


def test_reset_drops_the_spares(store: JournalStore, jdir: Path) -> None:
    fill(store, 100)
    store.write_pending()
    store.release(store.last_seq - 1)
    assert spare_files(jdir)
    store.reset(1)  # seqs start again lower: older files must not come back as segments
    assert spare_files(jdir) == [] and store.spare_count == 0
    records = fill(store, 40)
    store.close()
    reopened = _reopened(jdir)
    try:
        assert read_all(reopened, 1, 100, MiB) == b"".join(records)
    finally:
        reopened.close()


def test_a_reused_segment_whose_new_header_a_power_loss_lost_holds_no_records(
    store: JournalStore, jdir: Path
) -> None:
    fill(store, 100)
    store.write_pending()
    store.release(store.last_seq - 1)
    old_headers = {
        name: (jdir / name).read_bytes()[:SEGMENT_HEADER_BYTES] for name in spare_files(jdir)
    }
    spares = store.spare_count
    while store.spare_count == spares:  # until a roll took a spare: new header, rename
        store.append(store.next_seq, rec(store.next_seq))
    last = store.last_seq - 1
    store._pending.clear()
    reused = segment_files(jdir)[-1]
    store.close()
    # The rename reached the disk, the header write did not: the spare's own header is back.
    taken = [n for n in old_headers if n not in spare_files(jdir)]
    assert len(taken) == 1
    with (jdir / reused).open("r+b") as f:
        f.write(old_headers[taken[0]])

    reopened = _reopened(jdir)
    try:
        assert reopened.last_seq == last
        assert (jdir / reused).read_bytes()[:SEGMENT_HEADER_BYTES] != old_headers[taken[0]]
    finally:
        reopened.close()
