"""Destager on real files: restore-journal records onto sparse volumes, strictly in seq order.

Every test compares the volume files with a reference model: one bytearray per volume that
applies the same WRITE/TRIM/ZERO records in the same order (TRIM and ZERO read back as zeroes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.journal.record import Op, encode_record
from common.journal.store import JournalStore
from common.pairrecord import PairRecord, RecordSaver
from common.pairstate import Role
from common.volume import Volume
from secondaryd import destager as destager_module
from secondaryd.destager import Destager

KiB = 1 << 10
VOLUME_BYTES = 64 * KiB
NAMES = ("vol0", "vol1")
CAPACITY_BYTES = 16 << 20
SEGMENT_BYTES = 4 * KiB  # the smallest allowed: releases happen after a few records
OP_BYTES_MAX = 8 * KiB


@dataclass(frozen=True)
class Change:
    """One host request as the primary journaled it."""

    volume: str
    op: Op
    offset: int
    length: int
    payload: bytes = b""


def random_changes(rng: random.Random, count: int) -> list[Change]:
    changes = []
    for _ in range(count):
        op = rng.choice(list(Op))
        offset = rng.randrange(VOLUME_BYTES)
        length = rng.randint(1, min(OP_BYTES_MAX, VOLUME_BYTES - offset))
        payload = rng.randbytes(length) if op is Op.WRITE else b""
        changes.append(Change(rng.choice(NAMES), op, offset, length, payload))
    return changes


def reference_prefixes(changes: list[Change]) -> list[dict[str, bytes]]:
    """The model's volumes after each prefix: element k is the content after records 1..k."""
    model = {name: bytearray(VOLUME_BYTES) for name in NAMES}
    prefixes = [{name: bytes(data) for name, data in model.items()}]
    for change in changes:
        end = change.offset + change.length
        fill = change.payload if change.op is Op.WRITE else bytes(change.length)
        model[change.volume][change.offset : end] = fill
        prefixes.append({name: bytes(data) for name, data in model.items()})
    return prefixes


def apply_like_the_destager(volumes: dict[str, Volume], change: Change) -> None:
    volume = volumes[change.volume]
    if change.op is Op.WRITE:
        volume.write(change.offset, change.payload)
    else:
        volume.punch(change.offset, change.length)


def open_store(data_dir: Path, store_cls: type[JournalStore] = JournalStore) -> JournalStore:
    store, _ = store_cls.open(
        data_dir / "restore", CAPACITY_BYTES, SEGMENT_BYTES, log_name="restore journal"
    )
    return store


def open_volumes(data_dir: Path, volume_cls: type[Volume] = Volume) -> dict[str, Volume]:
    return {
        name: volume_cls.open_or_create(name, data_dir / f"{name}.img", VOLUME_BYTES)
        for name in NAMES
    }


def journal(store: JournalStore, changes: list[Change], *, durable: bool = True) -> None:
    """Append like the secondary does on receiving a batch; durable=True also runs its
    fdatasync (the destager only applies records durable in the restore journal)."""
    for change in changes:
        seq = store.next_seq
        record = encode_record(
            seq, change.volume, change.op, change.offset, change.length, change.payload, seq
        )
        store.append(seq, record)
    store.write_pending()
    if durable:
        store.prepare_sync().run()


def contents(volumes: dict[str, Volume]) -> dict[str, bytes]:
    return {name: volume.read(0, VOLUME_BYTES) for name, volume in volumes.items()}


def durable_record(data_dir: Path) -> PairRecord:
    return PairRecord.load(data_dir, Role.SECONDARY)


def segment_starts(store: JournalStore) -> list[int]:
    return sorted(int(path.stem) for path in store.directory.glob("*.seg"))


@dataclass
class Site:
    """The secondary's files, opened as secondaryd opens them."""

    data_dir: Path
    store: JournalStore
    volumes: dict[str, Volume]

    def destager(self, saver: RecordSaver | None = None) -> Destager:
        saver = saver or RecordSaver(self.data_dir)
        return Destager(self.store, self.volumes, durable_record(self.data_dir), saver)

    def close(self) -> None:
        self.store.close()
        for volume in self.volumes.values():
            volume.close()


@contextlib.contextmanager
def opened_site(
    data_dir: Path,
    volume_cls: type[Volume] = Volume,
    store_cls: type[JournalStore] = JournalStore,
) -> Iterator[Site]:
    store = open_store(data_dir, store_cls)
    site = Site(data_dir, store, {})
    try:
        site.volumes = open_volumes(data_dir, volume_cls)
        yield site
    finally:
        site.close()


async def destage_all(destager: Destager, data_dir: Path) -> None:
    """Run the destager (as secondaryd does) until pair.json says every record is applied
    and the restore journal released them all."""
    store = destager.store
    task = asyncio.create_task(destager.run())
    destager.kick()
    try:
        async with asyncio.timeout(1.5):
            while not task.done() and (
                store.first_seq <= store.last_seq
                or durable_record(data_dir).applied_seq < store.last_seq
            ):
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- applying -----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_destaging_random_writes_trims_and_zeros_gives_the_reference_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    monkeypatch.setattr(destager_module, "ROUND_ENTRIES", 7)  # many rounds, not one
    changes = random_changes(random.Random(seed), 120)
    expected = reference_prefixes(changes)[-1]
    with opened_site(tmp_path) as site:
        journal(site.store, changes)
        destager = site.destager()
        await destage_all(destager, tmp_path)
        assert destager.error is None
        assert contents(site.volumes) == expected, f"seed {seed}"
        assert durable_record(tmp_path).applied_seq == len(changes)


# -- recovery after a kill ----------------------------------------------------------------


def _killed_mid_round(
    tmp_path: Path, template: Path, changes: list[Change], cut: tuple[int, int, int]
) -> Path:
    """The files a SIGKILL leaves: checkpoint `applied` durable (journal released up to it),
    destage_intent_seq `intent` persisted, records 1..`on_volume` on the volumes (page
    cache), in order, as the destager applies them."""
    applied, on_volume, intent = cut
    data_dir = tmp_path / f"cut-{applied}-{on_volume}-{intent}"
    shutil.copytree(template / "restore", data_dir / "restore")
    with opened_site(data_dir) as site:
        for change in changes[:on_volume]:
            apply_like_the_destager(site.volumes, change)
        site.store.release(applied)
    record = PairRecord(Role.SECONDARY, applied_seq=applied, destage_intent_seq=intent)
    (data_dir / "pair.json").write_text(json.dumps(record.to_json()))  # as a save leaves it
    return data_dir


def test_recovery_after_a_kill_at_any_point_leaves_exactly_the_prefix_up_to_the_intent(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    count = 20
    changes = random_changes(rng, count)
    prefixes = reference_prefixes(changes)
    template = tmp_path / "template"
    with opened_site(template) as site:
        journal(site.store, changes)
    for on_volume in range(count + 1):  # every cut point
        applied = rng.randint(0, on_volume)
        intent = rng.randint(on_volume, count)
        cut = (applied, on_volume, intent)
        data_dir = _killed_mid_round(tmp_path, template, changes, cut)
        with opened_site(data_dir) as site:
            destager = site.destager()
            assert destager.recover() == intent - applied, cut
            assert contents(site.volumes) == prefixes[intent], cut
            assert destager.applied_seq == intent, cut
            # records after the round are still to destage, from intent + 1 on
            assert site.store.last_seq == count, cut
            assert site.store.first_seq <= intent + 1, cut
        assert durable_record(data_dir).applied_seq == intent, cut
        shutil.rmtree(data_dir)


def test_recovery_after_a_kill_after_a_checkpoint_does_nothing(tmp_path: Path) -> None:
    changes = random_changes(random.Random(11), 24)
    prefixes = reference_prefixes(changes)
    template = tmp_path / "template"
    with opened_site(template) as site:
        journal(site.store, changes)
    for applied in (0, 1, 13, 24):
        data_dir = _killed_mid_round(tmp_path, template, changes, (applied, applied, applied))
        state_before = (data_dir / "pair.json").read_bytes()
        with opened_site(data_dir) as site:
            first_seq = site.store.first_seq
            destager = site.destager()
            assert destager.recover() == 0
            assert destager.applied_seq == applied
            assert contents(site.volumes) == prefixes[applied]
            assert site.store.first_seq == first_seq
        assert (data_dir / "pair.json").read_bytes() == state_before


@pytest.mark.asyncio
async def test_destaging_after_recovery_resumes_with_the_record_after_the_intent(
    tmp_path: Path,
) -> None:
    changes = random_changes(random.Random(5), 30)
    prefixes = reference_prefixes(changes)
    template = tmp_path / "template"
    with opened_site(template) as site:
        journal(site.store, changes)
    data_dir = _killed_mid_round(tmp_path, template, changes, (4, 9, 17))
    with opened_site(data_dir) as site:
        destager = site.destager()
        assert destager.recover() == 13
        assert contents(site.volumes) == prefixes[17]
        await destage_all(destager, data_dir)
        assert contents(site.volumes) == prefixes[-1]


class KilledBeforeApplied(RecordSaver):
    """A real saver; the process 'dies' (never returns) when asked to save an applied_seq."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.killed = asyncio.Event()

    async def save(self, record: PairRecord) -> None:
        if record.applied_seq > 0:
            self.killed.set()
            await asyncio.Event().wait()
        await super().save(record)


@pytest.mark.asyncio
async def test_power_loss_before_the_restore_journal_sync_still_recovers_an_exact_prefix(
    tmp_path: Path,
) -> None:
    a1 = Change("vol0", Op.WRITE, 0, 512, b"\xa1" * 512)
    b2 = Change("vol0", Op.WRITE, 4 * KiB, 512, b"\xb2" * 512)
    a3 = Change("vol0", Op.WRITE, 0, 512, b"\xa3" * 512)
    c4 = Change("vol0", Op.WRITE, 8 * KiB, 512, b"\xc4" * 512)
    prefixes = reference_prefixes([a1, b2, a3, c4])
    with opened_site(tmp_path) as site:
        journal(site.store, [a1, b2])  # 1..2 durable in the restore journal
        synced = {path: path.stat().st_size for path in site.store.directory.glob("*.seg")}
        journal(site.store, [a3, c4], durable=False)  # received, its fdatasync not done yet
        saver = KilledBeforeApplied(tmp_path)
        destager = site.destager(saver)
        task = asyncio.create_task(destager.run())
        destager.kick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(saver.killed.wait(), 1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # The power loss: the restore journal loses what was not fdatasynced; the S-VOLs keep
    # what the destager's own checkpoint fdatasynced.
    for path in tmp_path.joinpath("restore").glob("*.seg"):
        if path in synced:
            os.truncate(path, synced[path])
        else:
            path.unlink()
    with opened_site(tmp_path) as site:
        site.destager().recover()
        # which of the four writes vol0 shows: a prefix would be none, a1, a1 b2, ...
        vol0 = site.volumes["vol0"]
        shown = [
            c.payload[:1].hex() for c in (a1, b2, a3, c4) if c.payload in vol0.read(0, 16 * KiB)
        ]
        assert contents(site.volumes) in prefixes, f"vol0 shows the writes {shown}"


# -- checkpoints --------------------------------------------------------------------------

Event = tuple[str, int, int]  # (what, a volume's index or a seq, what the files say)


class SyncLoggingVolume(Volume):
    """A real volume that notes its writes and completed syncs in a log shared with the test."""

    log: list[Event]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.log.append(("wrote", NAMES.index(self.name), 0))
        super().write(offset, data)

    def punch(self, offset: int, length: int) -> None:
        self.log.append(("wrote", NAMES.index(self.name), 0))
        super().punch(offset, length)

    def sync(self) -> None:
        super().sync()
        self.log.append(("synced", NAMES.index(self.name), 0))


class LoggingSaver(RecordSaver):
    """A real saver that notes the applied_seq of each save when asked, and once on disk."""

    def __init__(self, data_dir: Path, log: list[Event]) -> None:
        super().__init__(data_dir)
        self.log = log

    async def save(self, record: PairRecord) -> None:
        applied_seq = record.applied_seq
        self.log.append(("saving", applied_seq, 0))
        await super().save(record)
        self.log.append(("saved", applied_seq, durable_record(self._data_dir).applied_seq))


class ReleaseLoggingStore(JournalStore):
    """A real store that notes each release(), with what pair.json said at that moment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[Event] = []

    def release(self, upto_seq: int) -> int:
        durable_applied = durable_record(self.directory.parent).applied_seq
        freed_bytes = super().release(upto_seq)
        self.log.append(("released", upto_seq, durable_applied))
        self.log.append(("first_seq", self.first_seq, segment_starts(self)[0]))
        return freed_bytes


def _same_size_writes(count: int) -> list[Change]:
    """WRITEs of 1000 bytes: three records fill a 4 KiB segment."""
    return [
        Change(NAMES[seq % 2], Op.WRITE, seq * 1000, 1000, bytes([seq]) * 1000)
        for seq in range(1, count + 1)
    ]


@pytest.mark.asyncio
async def test_checkpoint_persists_applied_seq_after_the_volume_sync_then_releases_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(destager_module, "ROUND_ENTRIES", 5)
    monkeypatch.setattr(destager_module, "CHECKPOINT_S", 0.0)  # a checkpoint after each round
    changes = _same_size_writes(12)
    log: list[Event] = []
    with opened_site(tmp_path, SyncLoggingVolume, ReleaseLoggingStore) as site:
        for volume in site.volumes.values():
            assert isinstance(volume, SyncLoggingVolume)
            volume.log = log
        assert isinstance(site.store, ReleaseLoggingStore)
        site.store.log = log
        journal(site.store, changes)
        # where a segment starts, and the empty one kept once every record was released
        starts = [*segment_starts(site.store), len(changes) + 1]
        destager = site.destager(LoggingSaver(tmp_path, log))
        await destage_all(destager, tmp_path)

        assert contents(site.volumes) == reference_prefixes(changes)[-1]
        assert durable_record(tmp_path).applied_seq == len(changes)
        durable, unsynced = 0, set()  # applied_seq in pair.json; volumes with unsynced writes
        partial_release = False
        for what, seq, extra in log:
            if what == "wrote":
                unsynced.add(seq)
            elif what == "synced":
                unsynced.discard(seq)
            elif what == "saving":  # a new applied_seq only once the volumes were synced
                assert seq <= durable or unsynced == set(), log
            elif what == "saved":
                assert extra == seq  # the file says what was saved
                durable = max(durable, seq)
            elif what == "released":
                assert seq <= extra == durable, log  # released only what pair.json says
            elif what == "first_seq":  # after a release: whole segments of applied records go
                assert seq == max(start for start in starts if start <= durable + 1), log
                assert extra == seq  # the segment files on disk say the same
                partial_release = partial_release or 1 < seq <= len(changes)
        assert durable == len(changes)
        assert partial_release, log
        assert site.store.first_seq == len(changes) + 1  # all released; the next seq is kept

        log.clear()
        await destager.checkpoint()  # nothing new: no sync, no save, no release of more
        assert [event for event in log if event[0] in ("synced", "saving")] == []


# -- records that cannot be applied -------------------------------------------------------

BAD_RECORDS = {
    "unknown volume": Change("vol9", Op.WRITE, 0, 512, b"\x99" * 512),
    "write past the end": Change("vol0", Op.WRITE, VOLUME_BYTES - 256, 512, b"\x99" * 512),
    "trim past the end": Change("vol1", Op.TRIM, 4 * KiB, VOLUME_BYTES, b""),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", list(BAD_RECORDS))
async def test_a_record_that_cannot_be_applied_stops_destaging_before_it(
    tmp_path: Path, bad: str
) -> None:
    changes = [
        Change("vol0", Op.WRITE, 0, 4 * KiB, b"\x01" * 4 * KiB),
        Change("vol1", Op.WRITE, 8 * KiB, 4 * KiB, b"\x02" * 4 * KiB),
        Change("vol0", Op.WRITE, VOLUME_BYTES - 512, 512, b"\x03" * 512),  # ends at the end
        BAD_RECORDS[bad],
        Change("vol0", Op.WRITE, 0, 4 * KiB, b"\x05" * 4 * KiB),
        Change("vol1", Op.TRIM, 8 * KiB, 4 * KiB),
    ]
    prefixes = reference_prefixes(changes[:3])
    with opened_site(tmp_path) as site:
        journal(site.store, changes)
        destager = site.destager()
        destager.kick()
        await asyncio.wait_for(destager.run(), 1.5)  # returns: destaging stopped
        assert destager.error is not None
        assert "seq 4" in destager.error
        assert contents(site.volumes) == prefixes[3]
        assert destager.applied_seq < 4
        assert durable_record(tmp_path).applied_seq < 4
        assert site.store.last_seq == len(changes)  # nothing after it was released either


@pytest.mark.asyncio
async def test_a_checkpoint_spanning_a_reset_records_nothing_of_the_old_journal(
    tmp_path: Path,
) -> None:
    """A new generation resets the destager while a checkpoint waits for fdatasync: the
    checkpoint must neither persist its old seq nor release the new journal up to it."""
    changes = random_changes(random.Random(5), 20)
    with opened_site(tmp_path) as site:
        journal(site.store, changes)
        destager = site.destager()
        await destager.checkpoint()  # the first window, as run() starts
        await destager._round()
        assert destager.applied_seq > 0
        applied_before = durable_record(tmp_path).applied_seq
        loop = asyncio.get_running_loop()

        def reset_during_sync() -> None:  # what _new_generation does meanwhile, on the loop
            loop.call_soon_threadsafe(destager.reset, 0)
            time.sleep(0.05)

        destager._sync_volumes = reset_during_sync  # type: ignore[method-assign]
        await destager.checkpoint()
        assert durable_record(tmp_path).applied_seq == applied_before
        assert site.store.first_seq == 1, "the journal was released past a reset"
