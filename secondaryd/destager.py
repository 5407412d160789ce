"""Destager: restore-journal records onto the S-VOLs, strictly in seq order.

    checkpoint: fdatasync the S-VOLs ─► persist (applied_seq = A, destage_intent_seq = I)
                ─► release the restore journal up to A          (I: about WINDOW_BYTES past A)
    rounds:     up to ROUND_BYTES of records after applied, never past I, applied in order
                inline on the loop (an NBD read sees the S-VOLs between two rounds: always
                an exact prefix of the sequence)
    next checkpoint when applied reaches I, every CHECKPOINT_S, and once caught up with no
    new records for IDLE_CHECKPOINT_S

Recovery at start, before anything is served: records A+1..I may be partly on the S-VOLs
(killed mid-window, or a power loss with some of their pages written). Re-applying them all,
in order, in one synchronous step, restores an exact prefix; later records were never
touched. One state save per window keeps fsyncs few: each one on ext4 flushes every dirty
S-VOL block, so a save per round made the destager disk-bound at a fraction of the disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from common.journal.record import FLAG_REF, Entry, Op
from common.journal.store import JournalStore
from common.pairrecord import PairRecord, RecordSaver
from common.volume import Volume

log = logging.getLogger("journalpair.destage")

ROUND_ENTRIES = 16384
ROUND_BYTES = 16 << 20
WINDOW_BYTES = 128 << 20  # what recovery may have to re-apply before serving
CHECKPOINT_S = 1.0
IDLE_CHECKPOINT_S = 0.05  # caught up and no new records for this long: checkpoint


class DestageError(Exception):
    """A record that cannot be applied (unknown volume, out of range): destaging stops."""


class Destager:
    def __init__(
        self,
        store: JournalStore,
        volumes: Mapping[str, Volume],
        record: PairRecord,
        saver: RecordSaver,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.on_error = on_error  # destaging stopped: a bad record, or an S-VOL disk error
        self.volumes = volumes
        self.record = record
        self._saver = saver
        self.applied_seq = record.applied_seq  # in the page cache; record.applied_seq is durable
        self._kick = asyncio.Event()
        self._last_checkpoint = time.monotonic()
        self.error: str | None = None
        self._epoch = 0  # bumped by reset(): a checkpoint that spans one gives up

    def recover(self) -> int:
        """Synchronous, before serving: re-apply what a killed round may have left half done."""
        record = self.record
        upto = min(record.destage_intent_seq, self.store.last_seq)
        count = 0
        seq = record.applied_seq + 1
        while seq <= upto:
            entries = self.store.entries(seq, ROUND_ENTRIES, ROUND_BYTES)
            entries = [e for e in entries if e.seq <= upto]
            self._apply(entries)
            count += len(entries)
            seq = entries[-1].seq + 1
        if count:
            for volume in self.volumes.values():
                volume.sync()
            record.applied_seq = upto
            self._saver.save_now(record)
            self.store.release(upto)
            log.info("recovery: re-applied %d records up to seq %d", count, upto)
        self.applied_seq = record.applied_seq
        return count

    def kick(self) -> None:
        self._kick.set()

    def reset(self, applied_seq: int) -> None:
        """A new generation (or a dropped journal): the S-VOLs are about to be copied over
        from scratch. A checkpoint under way meanwhile must not then record its old seq."""
        self.applied_seq = applied_seq
        self._epoch += 1

    async def run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                while self.store.durable_seq > self.applied_seq:
                    if self.applied_seq >= self.record.destage_intent_seq:
                        await self.checkpoint()
                    await self._round()
                    if time.monotonic() - self._last_checkpoint >= CHECKPOINT_S:
                        await self.checkpoint()
                if not await self._kicked_within(IDLE_CHECKPOINT_S):
                    await self.checkpoint()
            except (DestageError, OSError) as exc:
                # An OSError is an S-VOL write or fdatasync that failed (a full or failing
                # disk): retrying an fdatasync proves nothing, so destaging stops here too.
                self.error = str(exc)
                log.error(
                    "destaging stopped at seq %d: %s",
                    self.applied_seq,
                    exc,
                    extra={"seq": self.applied_seq},
                )
                if self.on_error is not None:
                    self.on_error(self.error)
                return

    async def _kicked_within(self, seconds: float) -> bool:
        """Caught up: a checkpoint costs three fsyncs, so one per small batch (a host
        writing at QD1) would make the disk busy for nothing. Wait a little for more."""
        try:
            async with asyncio.timeout(seconds):
                await self._kick.wait()
        except TimeoutError:
            return False
        return True

    async def _round(self) -> None:
        # Only records durable in the restore journal: after a power loss, recovery re-applies
        # from that journal, so it must still hold everything the S-VOLs may have seen.
        limit = min(self.record.destage_intent_seq, self.store.durable_seq) - self.applied_seq
        if limit <= 0:
            return
        # Every record was crc-checked on its way in (append_blob) or at open (recovery).
        entries = self.store.entries(
            self.applied_seq + 1, min(ROUND_ENTRIES, limit), ROUND_BYTES, check_payload=False
        )
        if entries:
            self._apply(entries)
            self.applied_seq = entries[-1].seq
        await asyncio.sleep(0)

    async def checkpoint(self) -> None:
        """S-VOLs durable up to applied_seq, then say so with the next window, then free the
        restore journal."""
        self._last_checkpoint = time.monotonic()
        target = self.applied_seq
        intent = self._window_end(target)
        record = self.record
        if target == record.applied_seq and intent <= record.destage_intent_seq:
            return
        loop = asyncio.get_running_loop()
        epoch = self._epoch
        if target > record.applied_seq:
            await loop.run_in_executor(None, self._sync_volumes)
            if epoch != self._epoch:
                return  # reset meanwhile: `target` is a seq of the journal that was dropped
        record.applied_seq = target
        record.destage_intent_seq = max(intent, record.destage_intent_seq)
        await self._saver.save(record)
        if epoch == self._epoch:  # else releasing `target` could free the new generation's
            self.store.release(target)

    def _window_end(self, applied: int) -> int:
        """The last seq within WINDOW_BYTES after `applied` (at least one record)."""
        last = self.store.durable_seq
        if last <= applied:
            return applied
        held = self.store.bytes_between(applied + 1)
        low, high = applied + 1, last
        while low < high:  # the largest seq whose records after `applied` fit the window
            mid = (low + high + 1) // 2
            if held - self.store.bytes_between(mid + 1) <= WINDOW_BYTES:
                low = mid
            else:
                high = mid - 1
        return low

    def apply(self, entries: list[Entry]) -> None:
        """Apply records in order (the caller brings them in seq order, after applied_seq)."""
        self._apply(entries)

    def sync_volumes(self) -> None:
        self._sync_volumes()

    def _sync_volumes(self) -> None:
        for volume in self.volumes.values():
            volume.sync()

    def _apply(self, entries: list[Entry]) -> None:
        for entry in entries:
            volume = self.volumes.get(entry.volume)
            if volume is None:
                raise DestageError(f"seq {entry.seq}: no volume named {entry.volume!r} here")
            if entry.offset + entry.length > volume.size:
                raise DestageError(f"seq {entry.seq}: beyond the end of {entry.volume}")
            if entry.flags & FLAG_REF:  # the primary fills references in before sending
                raise DestageError(f"seq {entry.seq}: a reference record without its data")
            if entry.op is Op.WRITE:
                volume.write(entry.offset, entry.payload)
            elif entry.op is Op.TRIM:
                volume.punch(entry.offset, entry.length)
            else:
                volume.zero(entry.offset, entry.length, allocate=False)
