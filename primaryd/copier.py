"""Initial copy and resync: the P-VOLs' content as base-journal records, same pipeline.

    for each marked range of each volume (create marks every region, resync what changed):
        extents(pos)  hole ─► TRIM record (base), up to 1 GiB
                      data ─► reference record (base), up to 1 MiB: no data read now;
                              the master journal reads the P-VOL when it sends it
        journal over the copy window? wait for the secondary to release space
    done: the last base seq is the copy's end; COPY → PAIR once the secondary applied it
          (and every seq up to the last reference's read: MasterJournal.ref_horizon_seq)

A reference read when it is sent holds every host write made before the read: those with a
smaller seq are under it anyway, those with a larger seq are applied after it and write the
same bytes again. So the copy costs the journal headers only and each byte is read once.
Progress counts holes when they are journaled and data when it is sent (done_bytes), and
what the secondary applied (applied_bytes), which display's percent and ETA use.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from common.progress import RateMeter
from common.volume import Volume
from primaryd.master import MasterJournal

log = logging.getLogger("journalpair.copy")

DATA_STEP_BYTES = 1 << 20
HOLE_STEP_BYTES = 1 << 30  # one TRIM record covers at most this much of a hole
YIELD_EVERY_BYTES = 8 << 20  # let host I/O in at least this often
MARKS_MAX = 1000  # CopyProgress: applied bytes known to 0.1% of a pass


@dataclass
class CopyProgress:
    """How far a copy pass got: `done_bytes` journaled (holes) or sent (data) by this site,
    `applied_bytes` applied by the secondary. The second comes from the seqs the copy's
    records got: (seq, bytes journaled up to it) marks, at most MARKS_MAX a pass, each one
    after another 1/MARKS_MAX of the pass (and the last), so a lookup is a bisect."""

    done_bytes: int = 0
    total_bytes: int = 0
    applied_bytes: int = 0
    meter: RateMeter = field(default_factory=RateMeter)  # of applied_bytes: display's ETA
    _journaled_bytes: int = 0
    _mark_seqs: list[int] = field(default_factory=list)
    _mark_bytes: list[int] = field(default_factory=list)

    def restart(self, total_bytes: int) -> None:
        self.total_bytes, self.done_bytes, self.applied_bytes = total_bytes, 0, 0
        self._journaled_bytes = 0
        self._mark_seqs.clear()
        self._mark_bytes.clear()
        self.meter.update(0, time.monotonic())

    def advance(self, length: int) -> None:
        self.done_bytes += length

    def journaled(self, seq: int, length: int) -> None:
        """The copy's record `seq` covers `length` more bytes of the pass."""
        self._journaled_bytes += length
        last = self._mark_bytes[-1] if self._mark_bytes else 0
        step = max(1, self.total_bytes // MARKS_MAX)
        if self._journaled_bytes - last >= step or self._journaled_bytes >= self.total_bytes:
            self._mark_seqs.append(seq)
            self._mark_bytes.append(self._journaled_bytes)

    def secondary_applied(self, applied_seq: int) -> None:
        """The secondary applied every seq up to `applied_seq`."""
        marks = bisect.bisect_right(self._mark_seqs, applied_seq)
        self.applied_bytes = self._mark_bytes[marks - 1] if marks else 0
        self.meter.update(self.applied_bytes, time.monotonic())


class CopyAborted(Exception):
    """The journal filled up (the pair was suspended) or the copy was cancelled."""


Ranges = Mapping[str, Sequence[tuple[int, int]]]  # volume name -> (offset, length) to copy


async def copy_volumes(
    volumes: Sequence[Volume],
    journal: MasterJournal,
    progress: CopyProgress,
    wait_for_space: Callable[[], asyncio.Future[None] | None],
    ranges: Ranges,
    copied: Callable[[str, int, int], None] | None = None,
) -> int:
    """Send `ranges` of the volumes (the difference bitmaps' runs); `copied(volume, offset,
    length)` after each range is journaled. Returns the last base seq. `wait_for_space`
    returns a future to await when the journal holds more than the copy may use, else None."""
    plan = {v.name: ranges.get(v.name, ()) for v in volumes}
    progress.restart(sum(length for todo in plan.values() for _, length in todo))
    for volume in volumes:
        for offset, length in plan[volume.name]:
            await _copy_range(volume, offset, length, journal, progress, wait_for_space)
            # Records in the journal file before the bitmap forgets the range: a kill after
            # this finds them there (references are small and would otherwise sit in memory).
            journal.flush_records()
            if copied is not None:
                copied(volume.name, offset, length)
        log.info(
            "volume %s: base journal complete up to seq %d", volume.name, journal.store.last_seq
        )
    return journal.store.last_seq


async def _copy_range(
    volume: Volume,
    start: int,
    length: int,
    journal: MasterJournal,
    progress: CopyProgress,
    wait_for_space: Callable[[], asyncio.Future[None] | None],
) -> None:
    position, end = start, start + length
    since_yield = 0
    while position < end:
        waiter = wait_for_space()
        if waiter is not None:
            await waiter
            continue
        step, done = _copy_step(volume, journal, progress, position, end)
        position += step
        progress.advance(done)
        since_yield += step
        if since_yield >= YIELD_EVERY_BYTES:
            since_yield = 0
            await asyncio.sleep(0)


def _copy_step(
    volume: Volume, journal: MasterJournal, progress: CopyProgress, position: int, end: int
) -> tuple[int, int]:
    """Journal the region at `position` (before `end`): (its length, bytes done now)."""
    length = min(end - position, HOLE_STEP_BYTES)
    extent = volume.extents(position, length, max_extents=1)[0]
    if extent.hole:
        if not journal.append_base_hole(volume.name, position, extent.length):
            raise CopyAborted("journal full")
        progress.journaled(journal.store.last_seq, extent.length)
        return extent.length, extent.length
    step = min(extent.length, DATA_STEP_BYTES)
    if not journal.append_base_ref(volume.name, position, step):
        raise CopyAborted("journal full")
    progress.journaled(journal.store.last_seq, step)
    return step, 0  # counted when sent
