"""Destager: restore-journal records onto the S-VOLs, strictly in seq order.

    restore journal (durable) ──► round: up to ROUND_BYTES of records after applied_seq
        1. persist destage_intent_seq = round's last seq   (recovery knows what may be
                                                            partly applied)
        2. apply every record in order, inline on the loop (an NBD read sees the S-VOLs
           between two rounds: always an exact prefix of the sequence)
        3. checkpoint (at most every CHECKPOINT_S, and when caught up):
           fdatasync the S-VOLs ─► persist applied_seq ─► release the restore journal

Recovery at start, before anything is served: records applied_seq+1..destage_intent_seq
may be partly on the S-VOLs (a kill mid-round). Re-applying them all, in order, in one
synchronous step, restores an exact prefix; later records were never touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from common.journal.record import Entry, Op
from common.journal.store import JournalStore
from common.pairrecord import PairRecord, RecordSaver
from common.volume import Volume

log = logging.getLogger("journalpair.destage")

ROUND_ENTRIES = 16384
ROUND_BYTES = 16 << 20
CHECKPOINT_S = 0.5


class DestageError(Exception):
    """A record that cannot be applied (unknown volume, out of range): destaging stops."""


class Destager:
    def __init__(
        self,
        store: JournalStore,
        volumes: Mapping[str, Volume],
        record: PairRecord,
        saver: RecordSaver,
    ) -> None:
        self.store = store
        self.volumes = volumes
        self.record = record
        self._saver = saver
        self.applied_seq = record.applied_seq  # in the page cache; record.applied_seq is durable
        self._kick = asyncio.Event()
        self._last_checkpoint = time.monotonic()
        self.error: str | None = None

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
        """A new generation: the S-VOLs are about to be copied over from scratch."""
        self.applied_seq = applied_seq

    async def run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                while self.store.last_seq > self.applied_seq:
                    await self._round()
                    if time.monotonic() - self._last_checkpoint >= CHECKPOINT_S:
                        await self.checkpoint()
                await self.checkpoint()
            except DestageError as exc:
                self.error = str(exc)
                log.error("destaging stopped: %s", exc)
                return

    async def _round(self) -> None:
        entries = self.store.entries(self.applied_seq + 1, ROUND_ENTRIES, ROUND_BYTES)
        if not entries:
            return
        last = entries[-1].seq
        if self.record.destage_intent_seq < last:
            self.record.destage_intent_seq = last
            await self._saver.save(self.record)
        self._apply(entries)
        self.applied_seq = last
        await asyncio.sleep(0)

    async def checkpoint(self) -> None:
        """S-VOLs durable up to applied_seq, then say so, then free the restore journal."""
        self._last_checkpoint = time.monotonic()
        target = self.applied_seq
        if target <= self.record.applied_seq:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._sync_volumes)
        self.record.applied_seq = target
        await self._saver.save(self.record)
        self.store.release(target)

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
            if entry.op is Op.WRITE:
                volume.write(entry.offset, entry.payload)
            elif entry.op is Op.TRIM:
                volume.punch(entry.offset, entry.length)
            else:
                volume.zero(entry.offset, entry.length, allocate=False)
