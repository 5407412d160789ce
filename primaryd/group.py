"""The primary side of one journal group: pair state, master journal, copy, read-journal.

    pairctl create ─► check secondary + volume sizes ─► mark every region ─► persist COPY
                   (new generation) ─► drop the link (the secondary says Hello again, resets)
    pairctl resync ─► persist COPY (new generation) ─► drop the link
    Hello ─► Welcome ◄─ ReportBitmap per volume: merged into ours, persisted, BitmapTaken
                   ─► every volume reported in this generation: the copier journals the
                      marked regions (the union of both sides' bitmaps) ─► copy end
    READ_JOURNAL(from, restored, applied) ─► release ≤ restored ─► batch (or long poll)
                   applied ≥ copy end ─► persist PAIR
    journal full ─► PFUS: host writes go to the bitmap (never fail)

Every state change goes through _transition(): table lookup, persist, then act, event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from common.bitmap import BitmapError, DifferenceBitmap, load_bitmaps, save_bitmaps
from common.config import Config
from common.control import ControlRefused
from common.events import EventLog
from common.journal.record import CorruptRecord, TruncatedRecord
from common.journal.store import JournalCorrupt, JournalStore
from common.linksecurity import load_link_security
from common.marklog import MarkLog
from common.pairrecord import PairRecord, RecordSaver
from common.pairstate import (
    HIGH_WATER_DEFAULT,
    PairInput,
    PairState,
    Refused,
    Role,
    is_suspended,
    journals_writes,
    next_state,
    secondary_view,
)
from common.replication.messages import (
    PROTOCOL_VERSION,
    BitmapTaken,
    Hello,
    JournalBatch,
    ReadJournal,
    Refuse,
    RefuseCode,
    ReportBitmap,
    SwapAnswer,
    SwapKind,
    SwapRequest,
    VolumeDesc,
    Welcome,
)
from common.replication.server import ReplicationServer
from common.runmarker import LastStop
from common.service import journal_loss_handled
from common.siteid import site_id
from common.volume import Volume
from primaryd.copier import CopyAborted, CopyProgress, Ranges, copy_volumes
from primaryd.master import MasterJournal, Mode
from primaryd.rpo import RpoChange, RpoWatch

log = logging.getLogger("journalpair.primary")

LONG_POLL_MAX_S = 5.0
# A read-journal answer that would carry fewer bytes waits this long for more (lag cost).
GATHER_BYTES = 256 << 10
GATHER_S = 0.005
BITMAP_SAVE_S = 1.0
SPLIT_FLUSH_S = 30.0
WATCH_S = 0.1  # how often journal use (PFUL) and the path watch (PSUE) are looked at
LINK_LOST = "link lost"  # the reason of a path-watch suspension starts so (auto-resync)
COPY_WINDOW_FRACTION = 0.5  # the copy waits while the journal is fuller than this
NO_GENERATION = "none"  # Welcome needs a non-empty generation; SMPL has none
SWAP_COMMIT_S = 120.0  # a takeover swap not committed by then: hosts may write here again
SWITCH_DELAY_S = 0.2  # lets the answer that decided a role switch reach its asker first


class PrimaryGroup:
    def __init__(
        self,
        config: Config,
        volumes: Mapping[str, Volume],
        store: JournalStore,
        record: PairRecord,
        events: EventLog,
    ) -> None:
        self.config = config
        self.volumes = volumes
        self.store = store
        self.record = record
        self.events = events
        self._saver = RecordSaver(config.data_dir)
        self.bitmaps = load_bitmaps(
            config.data_dir, {n: v.size for n, v in volumes.items()}, config.pair.bitmap_region
        )
        self.marks = MarkLog(config.data_dir / "bitmaps", self.bitmaps)
        self.journal = MasterJournal(
            store,
            volumes,
            self.bitmaps,
            on_full=self._journal_full,
            marks=self.marks,
            on_failed=self._journal_failed,
        )
        if self.marks.replay() and is_suspended(record.state):
            self.journal.host_marks += 1  # host writes marked just before an unclean stop
        self._save_bitmaps()
        self.site_id = site_id(config.data_dir)  # a paired secondary follows only this site
        self.link_server = ReplicationServer(self, load_link_security(config.link))
        self.copy = CopyProgress()
        self.journal.on_ref_sent = self._ref_sent
        self._copy_task: asyncio.Task[None] | None = None
        self._space_freed: asyncio.Future[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._bitmap_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.last_stop = LastStop.CLEAN  # set by the service before start()
        self.journal_lost = ""  # set by the service: why the master journal was set aside
        self.secondary: Hello | None = None
        self.link_peer = ""
        self.link_since = time.time()
        self.restored_seq = 0
        self.applied_seq = 0
        self.peer_state = ""  # the secondary's state, as its last Hello said
        self.peer_written = False  # hosts wrote the S-VOLs while SSWS (its last Hello)
        self.last_contact = time.monotonic()  # the secondary's last bytes (path watch)
        self._last_read_journal = time.monotonic()  # the secondary's last request (metrics)
        self._pful_since = time.monotonic()  # PFUL since (overflow watch)
        self._reported: set[str] = set()  # volumes whose bitmap came in this generation
        # Hosts may write the P-VOLs (True) or not (a swap is under way); set by the service.
        self.host_access: Callable[[bool], None] = lambda allowed: None
        self._swap_timer: asyncio.TimerHandle | None = None
        self.switch_to: Role | None = None  # a swap made this site the secondary
        self.switching = asyncio.Event()
        self._all_reported = asyncio.Event()
        self.journal.mode = _mode_for(record.state)
        target_s = config.pair.rpo_target_s
        self._rpo = None if target_s is None else RpoWatch(target_s, config.pair.inflow_control)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        self._tasks = tasks
        self._bitmap_task = tasks.create_task(self._save_bitmaps_forever())
        self._watch_task = tasks.create_task(self._watch())
        listen = self.config.replication_listen
        assert listen is not None, "the config loader requires listen.replication on a primary"
        if not self.record.generation and self.record.state is not PairState.SMPL:
            self._after_swap()
        host, port = await self.link_server.start(listen.host, listen.port)
        log.info(
            "group %s: %s, journal seq %d..%d, read-journal on %s:%d",
            self.config.group,
            self.record.state.value,
            self.store.first_seq,
            self.store.last_seq,
            host,
            port,
        )
        if self.journal_lost:
            if self.record.state is not PairState.SMPL:
                self._suspend_with_every_region_marked(
                    f"master journal lost: {self.journal_lost}: full resync needed",
                    "the master journal was unreadable and set aside: records the secondary "
                    "had not restored are gone; suspending the pair, every region marked",
                )
            journal_loss_handled(self.store.directory)
        elif self.last_stop is LastStop.SYSTEM_CRASH and journals_writes(self.record.state):
            self._after_system_crash()
        elif not self.journal.check_tail():
            log.warning("the last stop was unclean: writes of its last batch were re-sent")
        if self.record.state is PairState.COPY and self.record.copy_end_seq == 0:
            # The regions still to copy are still marked: they are cleared once journaled.
            log.info(
                "the copy was interrupted by the last stop: %d bytes left to copy once the "
                "secondary has reported its bitmaps",
                self._dirty_bytes(),
            )
            self._start_copy()

    async def stop(self) -> None:
        for task in (self._bitmap_task, self._watch_task):
            if task is not None:
                task.cancel()
        if self._copy_task is not None:
            self._copy_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, CopyAborted):
                await self._copy_task
        await self.link_server.stop()
        self._save_bitmaps()
        self.marks.close()

    # -- pairctl verbs -----------------------------------------------------------------------

    async def create(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        state = self.record.next_state(PairInput.CREATE)
        self._check_secondary_volumes("create")
        for bitmap in self.bitmaps.values():
            bitmap.mark_all()  # the initial copy is a resync of everything
        self._new_generation(self._dirty_bytes())
        self._transition(state, "create by operator")
        self.link_server.drop_all("new pair generation")
        self._start_copy()
        return {"message": f"pair {self.config.group}: COPY started"}

    async def split(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """PAIR -> PSUS: from now on writes go to the bitmap; the journal up to here is
        flushed to the secondary first, so the S-VOL is consistent at the split point."""
        rw = bool(args.get("rw"))
        state = self.record.next_state(PairInput.SPLIT_RW if rw else PairInput.SPLIT)
        if self._copy_task is not None:
            self._copy_task.cancel()
        split_seq = self.store.last_seq
        self.journal.mode = Mode.BITMAP  # the split point: later writes are marked
        flushed = await self._wait_applied(split_seq, SPLIT_FLUSH_S)
        reason = "split --rw by operator" if rw else "split by operator"
        if not flushed:
            reason += f" (journal not flushed past seq {self.applied_seq}: link down or slow)"
        self.record.svol_writable = rw
        self._suspend(state, reason)
        message = f"pair {self.config.group}: PSUS at seq {split_seq}"
        if not flushed:
            message += (
                f"; the secondary applied only up to {self.applied_seq}, the rest is in the bitmap"
            )
        if rw:
            message += "; the secondary turns SSWS (writable) when it hears of it"
        return {"message": message}

    async def resync(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """PSUS/PSUE/PFUS -> COPY -> PAIR, copying only the regions the bitmaps mark."""
        if args.get("swap"):
            raise ControlRefused(
                "cannot resync --swap on the primary: run it on the secondary (SSWS), "
                "which becomes the primary"
            )
        return self._resync(bool(args.get("discard_secondary")), "by operator")

    def _resync(self, discard_secondary: bool, by: str) -> Mapping[str, Any]:
        state = self.record.next_state(PairInput.RESYNC)
        self._check_secondary_volumes("resync")
        self._check_split_brain(discard_secondary)
        self._swap_off("resync")
        marked = self._dirty_bytes()
        self._new_generation(marked)
        reason = f"resync {by}: {marked} bytes marked here"
        if self.peer_written:
            reason += "; the secondary's writes while SSWS are overwritten"
        self._transition(state, reason)
        self.link_server.drop_all("resync: new journal generation")
        self._start_copy()
        return {
            "message": f"pair {self.config.group}: COPY started, {marked} bytes marked here, "
            "plus what the secondary reports"
        }

    async def delete(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        state = self.record.next_state(PairInput.DELETE)
        if self._copy_task is not None:
            self._copy_task.cancel()
        self.store.reset(self.store.next_seq)
        for bitmap in self.bitmaps.values():
            bitmap.clear_all()
        self.record.generation = ""
        self.record.svol_consistent = False
        self.record.svol_writable = self.record.written_while_split = False
        self._transition(state, "delete by operator")
        self.link_server.drop_all("pair deleted")
        return {"message": f"pair {self.config.group}: deleted (SMPL)"}

    def display(self) -> dict[str, Any]:
        lag_entries = max(0, self.store.last_seq - self.applied_seq)
        result: dict[str, Any] = {
            "group": self.config.group,
            "role": Role.PRIMARY.value,
            "state": self.record.state.value,
            "reason": self.record.reason,
            "generation": self.record.generation,
            "volumes": [
                {"name": v.name, "size": v.size, "path": str(v.path)} for v in self.volumes.values()
            ],
            "lag": {
                "entries": lag_entries,
                "bytes": self._lag_bytes() if lag_entries else 0,
                "seconds": self._lag_seconds() if lag_entries else 0.0,
            },
            "journal": {
                "used_bytes": self.store.used_bytes,
                "capacity_bytes": self.store.capacity_bytes,
            },
            "seq": {
                "first": self.store.first_seq,
                "last": self.store.last_seq,
                "restored": self.restored_seq,
                "applied": self.applied_seq,
            },
            "link": {
                "up": self.secondary is not None,
                "peer": self.link_peer,
                "since": _iso(self.link_since),
                "for_s": round(max(0.0, time.time() - self.link_since), 1),
            },
            "bitmap": {"dirty_bytes": self._dirty_bytes()},
            "peer": self._peer_view(),
            "written_while_split": self.record.written_while_split,
            "split_brain": self._split_brain(),
        }
        if self.record.state is PairState.COPY:
            result["copy"] = self._copy_view()
        return result

    def _peer_view(self) -> dict[str, Any]:
        """What this site knows of the secondary: its Hello, its last read-journal request."""
        return {
            "state": self.peer_state,  # as its last Hello said
            "written_while_split": self.peer_written,
            "sent_state": self._secondary_state().value if self.secondary is not None else "",
            "restored_seq": self.restored_seq,
            "applied_seq": self.applied_seq,
            "silent_s": round(max(0.0, time.monotonic() - self.last_contact), 1),
        }

    def _copy_view(self) -> dict[str, Any]:
        total = self.copy.total_bytes or self.record.copy_total_bytes
        now_s = time.monotonic()
        rate = self.copy.meter.rate_bytes_per_s(now_s)
        eta_s = self.copy.meter.eta_s(total, now_s)
        return {
            "done_bytes": self.copy.done_bytes,
            "total_bytes": total,
            "applied_bytes": self.copy.applied_bytes,
            "rate_bytes_per_s": None if rate is None else round(rate),
            "eta_s": None if eta_s is None else round(eta_s, 1),
        }

    # -- the read-journal side (common.replication.server.JournalSource) --------------------

    def welcome(self, hello: Hello, peer: str) -> Welcome | Refuse:
        if hello.group != self.config.group:
            return Refuse(
                RefuseCode.GROUP,
                f"this primary serves group {self.config.group!r}, not {hello.group!r}",
            )
        if self.secondary is not None:
            return Refuse(RefuseCode.BUSY, f"another secondary is connected ({self.link_peer})")
        self.secondary = hello
        self.last_contact = time.monotonic()
        self.link_peer, self.link_since = peer, time.time()
        self.restored_seq, self.applied_seq = hello.restored_seq, hello.applied_seq
        self.peer_state, self.peer_written = hello.state, hello.svol_written
        if hello.state == PairState.SMPL.value and self.record.state is not PairState.SMPL:
            # Not paired there (a new or wiped secondary site, or its pair state was lost):
            # nothing of its volumes is known, so a resync must copy them whole. (Right after
            # a create every region is marked already, and the copy waits for its reports.)
            if any(b.dirty_bytes < b.volume_size for b in self.bitmaps.values()):
                log.error(
                    "the secondary at %s is SMPL while this pair is %s: every region marked; "
                    "resync copies the whole volumes",
                    peer,
                    self.record.state.value,
                )
                for bitmap in self.bitmaps.values():
                    bitmap.mark_all()
                self._save_bitmaps()
            if self.record.state in (PairState.PAIR, PairState.PFUL):
                self._suspend(
                    self.record.next_state(PairInput.LINK_LOST),
                    "the secondary is not paired (SMPL)",
                )
        elif hello.failure and journals_writes(self.record.state):
            log.error(
                "the secondary at %s failed: %s; suspending the pair, its unrestored records "
                "marked for the resync",
                peer,
                hello.failure,
            )
            self._suspend(
                self.record.next_state(PairInput.LINK_LOST),
                f"secondary failure: {hello.failure}",
            )
        elif (
            hello.state == PairState.SSWS.value
            and hello.generation == self.record.generation
            and journals_writes(self.record.state)
        ):
            # It took over while this site was cut off: our journal no longer reaches it.
            self._suspend(
                next_state(Role.PRIMARY, self.record.state, PairInput.LINK_LOST),
                "the secondary took over (it is SSWS)",
            )
        if self._split_brain():
            log.error(
                "split brain: hosts wrote both the P-VOLs (while suspended) and the S-VOLs "
                "(SSWS); resync needs --discard-secondary here, or resync --swap there"
            )
        elif (
            self.config.pair.auto_resync
            and self.record.state is PairState.PSUE
            and self.record.reason.startswith(LINK_LOST)
            and self._tasks is not None
        ):
            self._tasks.create_task(self._auto_resync())
        return Welcome(
            version=PROTOCOL_VERSION,
            group=self.config.group,
            generation=self.record.generation or NO_GENERATION,
            start_seq=min(self.record.start_seq, self.store.next_seq),
            first_seq=self.store.first_seq,
            last_seq=self.store.last_seq,
            state=self._secondary_state().value,
            volumes=self._volume_descs(),
            site_id=self.site_id,
        )

    def report_bitmap(self, report: ReportBitmap) -> BitmapTaken | Refuse:
        self.last_contact = time.monotonic()
        return self._take_bitmap(report)

    def _take_bitmap(self, report: ReportBitmap) -> BitmapTaken | Refuse:
        """The secondary's difference bitmap joins ours: persisted before it is acknowledged
        (the secondary then clears its own), copied at the next resync or by the copy that
        waits for it."""
        volume = self.volumes.get(report.volume)
        mine = self.bitmaps.get(report.volume)
        if volume is None or mine is None:
            return Refuse(RefuseCode.BAD_REQUEST, f"no volume {report.volume!r} here")
        try:  # the secondary's regions may differ in size from ours
            theirs = DifferenceBitmap.decode(report.bitmap, volume.size)
        except BitmapError as exc:
            return Refuse(RefuseCode.BAD_REQUEST, f"bitmap of {report.volume}: {exc}")
        if theirs.dirty_regions:
            theirs.union_into(mine)
            self._save_bitmaps()
            log.info(
                "volume %s: the secondary reported %d changed bytes; they are copied from here",
                report.volume,
                theirs.dirty_bytes,
            )
        if report.generation == self.record.generation:
            self._reported.add(report.volume)
            if self._reported >= set(self.volumes):
                self._all_reported.set()
        return BitmapTaken(report.volume)

    def heard(self) -> None:
        self.last_contact = time.monotonic()

    def read_journal_age_s(self) -> float:
        """Seconds since the secondary's last read-journal request (or this group's start)."""
        return time.monotonic() - self._last_read_journal

    def link_closed(self, peer: str) -> None:
        if peer == self.link_peer:
            self.secondary = None
            self._swap_off("the link to the secondary dropped")
            self.link_since = time.time()

    async def read_journal(self, request: ReadJournal) -> JournalBatch | Refuse:
        self.last_contact = self._last_read_journal = time.monotonic()
        try:
            return await self._read_journal(request)
        finally:
            self.last_contact = time.monotonic()  # a long poll is contact too

    async def _read_journal(self, request: ReadJournal) -> JournalBatch | Refuse:
        self.peer_written = self.peer_written or request.svol_written
        self._secondary_position(request.restored_seq, request.applied_seq)
        store = self.store
        if not store.first_seq <= request.from_seq <= store.next_seq and is_suspended(
            self.record.state
        ):
            return self._status_batch(request)  # the gap is in the bitmaps, not lost
        if not store.first_seq <= request.from_seq <= store.next_seq:
            return Refuse(
                RefuseCode.NEEDS_COPY,
                f"seq {request.from_seq} is not in the master journal "
                f"({store.first_seq}..{store.last_seq}): the pair needs a copy",
            )
        if request.from_seq == store.next_seq:
            wait_s = min(request.max_wait_ms / 1000, LONG_POLL_MAX_S)
            await self.journal.wait_for_records(request.from_seq - 1, wait_s)
        if 0 < store.bytes_between(request.from_seq) < GATHER_BYTES:
            # A few records only: let more come, so that both sides pay their per-batch
            # costs (a frame, a restore-journal write and fdatasync) per many host writes.
            await asyncio.sleep(GATHER_S)
        if not store.first_seq <= request.from_seq <= store.next_seq:  # reset meanwhile
            return Refuse(RefuseCode.NEEDS_COPY, "the master journal was reset")
        try:
            records, count = self.journal.read(
                request.from_seq, request.max_entries, request.max_bytes
            )
        except OSError as exc:
            self._suspend(
                self.record.next_state(PairInput.LINK_LOST),
                f"cannot read a P-VOL to send the copy: {exc}",
            )
            return self._status_batch(request)
        except (JournalCorrupt, CorruptRecord, TruncatedRecord) as exc:
            self._suspend_with_every_region_marked(
                f"master journal damaged: {exc}",
                f"master journal damaged while reading seq {request.from_seq} for the "
                f"secondary: {exc}; suspending the pair, every region marked for resync",
            )
            return self._status_batch(request)
        return self._status_batch(request, records, count)

    def _status_batch(
        self, request: ReadJournal, records: bytes = b"", count: int = 0
    ) -> JournalBatch:
        store = self.store
        return JournalBatch(
            first_seq=request.from_seq,
            count=count,
            records=records,
            last_seq=store.last_seq,
            state=self._secondary_state().value,
            copy_done_bytes=min(self.copy.done_bytes, self.copy.total_bytes),
            copy_total_bytes=self.copy.total_bytes,
            primary_time_ns=time.time_ns(),
        )

    # -- internals -----------------------------------------------------------------------

    def _secondary_position(self, restored_seq: int, applied_seq: int) -> None:
        self.restored_seq, self.applied_seq = restored_seq, applied_seq
        if self.record.state is PairState.COPY:
            self.copy.secondary_applied(applied_seq)
        freed = self.store.release(min(restored_seq, self.store.last_seq))
        if freed and self._space_freed is not None and not self._space_freed.done():
            self._space_freed.set_result(None)
        record = self.record
        if (
            record.state is PairState.COPY
            and record.copy_end_seq
            and applied_seq >= max(record.copy_end_seq, self.journal.ref_horizon_seq)
        ):
            record.svol_consistent = True
            self._transition(
                next_state(Role.PRIMARY, record.state, PairInput.COPY_DONE),
                f"copy done: {record.copy_total_bytes} bytes copied",
                copied_bytes=record.copy_total_bytes,
            )

    async def _watch(self) -> None:
        """PAIR <-> PFUL around the high-water mark: the operator sees the journal filling up
        before it is full (PFUS). No request from the secondary for path_watch_s while the
        journal flows: PSUE, the journal goes to the bitmaps (it would only fill up)."""
        while True:
            await asyncio.sleep(WATCH_S)
            if self.link_server.drained():
                self.last_contact = time.monotonic()  # an answer still crossing a slow link
            silent_s = time.monotonic() - self.last_contact
            if journals_writes(self.record.state) and silent_s > self.config.pair.path_watch_s:
                link = "is down" if self.secondary is None else "is up but silent"
                self._suspend(
                    self.record.next_state(PairInput.LINK_LOST),
                    f"{LINK_LOST}: no read-journal from the secondary for {silent_s:.1f} s "
                    f"(path_watch_s {self.config.pair.path_watch_s:g}); the link {link}",
                )
                self.link_server.drop_all("path watch expired")
                continue
            use = self.store.used_bytes / self.store.capacity_bytes
            state = self.record.state
            if state is PairState.PAIR and use >= HIGH_WATER_DEFAULT:
                self._pful_since = time.monotonic()
                self._transition(
                    self.record.next_state(PairInput.JOURNAL_HIGH), f"journal {use:.0%} full"
                )
            elif state is PairState.PFUL and use < HIGH_WATER_DEFAULT:
                self._transition(
                    self.record.next_state(PairInput.JOURNAL_LOW), f"journal {use:.0%} full"
                )
            elif (
                state is PairState.PFUL
                and time.monotonic() - self._pful_since > self.config.pair.overflow_watch_s
            ):
                self._suspend(
                    self.record.next_state(PairInput.JOURNAL_FULL),
                    f"journal over the high-water mark ({use:.0%}) for more than "
                    f"overflow_watch_s {self.config.pair.overflow_watch_s:g}",
                )
            if self._rpo is not None:
                self._watch_rpo(self._rpo)

    def _watch_rpo(self, rpo: RpoWatch) -> None:
        """The lag against pair.rpo_target_s, in PAIR and PFUL only (COPY is behind by
        design, a suspended pair has no lag to speak of): an event when it goes over and
        when it is back under; with inflow control, the host write reply delay."""
        state = self.record.state
        if state not in (PairState.PAIR, PairState.PFUL):
            if rpo.over:
                log.info("RPO watch off: the pair is %s", state.value, extra=self._fields())
            rpo.reset()
            self.journal.ack_delay_s = 0.0
            return
        lag_s = self._lag_seconds() if self.store.last_seq > self.applied_seq else 0.0
        change = rpo.update(lag_s, time.monotonic())
        self.journal.ack_delay_s = rpo.ack_delay_s(lag_s)
        if change is None:
            return
        oldest = self.applied_seq + 1  # the record whose age is the lag
        if change is RpoChange.EXCEEDED:
            inflow = "; inflow control: host write replies delayed" if rpo.inflow_control else ""
            reason = f"lag {lag_s:.1f} s over rpo_target_s {rpo.target_s:g}{inflow}"
            self.events.notice(
                change.value,
                state.value,
                reason,
                logging.WARNING,
                lag_s=round(lag_s, 3),
                target_s=rpo.target_s,
                seq=oldest,
            )
        else:
            over_s = time.monotonic() - rpo.over_since
            reason = (
                f"lag {lag_s:.1f} s back under rpo_target_s {rpo.target_s:g} "
                f"(peak {rpo.peak_lag_s:.1f} s, over for {over_s:.1f} s)"
            )
            self.events.notice(
                change.value,
                state.value,
                reason,
                lag_s=round(lag_s, 3),
                target_s=rpo.target_s,
                peak_lag_s=round(rpo.peak_lag_s, 3),
                seq=oldest,
            )

    def _fields(self, **more: Any) -> dict[str, Any]:
        """The log fields of this group (common.logsetup.FIELDS)."""
        return {
            "group": self.config.group,
            "role": Role.PRIMARY.value,
            "state": self.record.state.value,
            **more,
        }

    async def _save_bitmaps_forever(self) -> None:
        """While suspended, marks go to the bitmaps in memory; a crash must not lose more
        than BITMAP_SAVE_S of them (a resync would skip those regions)."""
        while True:
            await asyncio.sleep(BITMAP_SAVE_S)
            # On the loop thread, like every other save: two saves of one file at once (this
            # in an executor, a transition's on the loop) raced on the same .tmp file. A
            # bitmap is 2 KiB per GiB; its fsyncs cost a few ms, once a second at most.
            self._save_bitmaps()

    # -- role swaps (asked by the secondary: resync --swap, takeover) -------------------------

    async def swap(self, request: SwapRequest) -> SwapAnswer | Refuse:
        try:
            return self._swap_step(request.kind)
        except Refused as exc:
            return Refuse(RefuseCode.BAD_REQUEST, str(exc))
        except ControlRefused as exc:
            return Refuse(RefuseCode.BAD_REQUEST, exc.reason)

    def _swap_step(self, kind: SwapKind) -> SwapAnswer:
        record = self.record
        if kind is SwapKind.COMMIT:
            if self._swap_timer is None:
                raise ControlRefused("cannot commit a swap: no takeover is under way here")
            self._swap_timer.cancel()
            self._swap_timer = None
            self._become_secondary(
                PairState.PAIR, "takeover (swap) by the secondary", SwapKind.COMMIT
            )
            return SwapAnswer(kind, self.store.last_seq)
        inp = PairInput.RESYNC_SWAP if kind is SwapKind.RESYNC else PairInput.TAKEOVER_SWAP
        state = next_state(Role.PRIMARY, record.state, inp)
        if self.config.primary is None:
            raise ControlRefused(
                f"cannot {kind.value}: this site cannot become the secondary: its config has "
                "no primary: address (the other site's listen.replication)"
            )
        if kind is SwapKind.RESYNC:
            if self.peer_state != PairState.SSWS.value:
                raise ControlRefused("cannot resync --swap: the secondary is not SSWS")
            self.host_access(False)  # the P-VOLs become S-VOLs
            self._save_bitmaps()  # what hosts wrote here while split: reported to the new primary
            self._become_secondary(state, "resync --swap by the secondary", SwapKind.RESYNC)
            return SwapAnswer(kind, self.store.last_seq)
        # TAKEOVER: no host write after this point, so the secondary can apply all of them.
        self.host_access(False)
        self.journal.flush_records()
        if self._swap_timer is not None:
            # An earlier takeover's timer would let hosts write in the middle of this one,
            # and those acknowledged writes would be lost at its COMMIT.
            self._swap_timer.cancel()
        loop = asyncio.get_running_loop()
        self._swap_timer = loop.call_later(SWAP_COMMIT_S, self._swap_abandoned)
        log.warning(
            "takeover (swap) asked by the secondary: host writes stopped at seq %d until it "
            "has applied them (at most %.0f s)",
            self.store.last_seq,
            SWAP_COMMIT_S,
        )
        return SwapAnswer(kind, self.store.last_seq)

    def _swap_abandoned(self) -> None:
        self._swap_timer = None
        log.error(
            "the takeover (swap) was not committed in %.0f s: hosts write here again", SWAP_COMMIT_S
        )
        self.host_access(True)

    def _swap_off(self, why: str) -> None:
        """A takeover swap that can no longer commit (its link dropped, the pair suspended
        or resyncs) leaves this site the primary, serving its hosts at once (HUR): the
        secondary becomes the primary only with this site's answer to COMMIT, which a
        new link can no longer get (no takeover under way here)."""
        if self._swap_timer is None:
            return
        self._swap_timer.cancel()
        self._swap_timer = None
        log.warning("the takeover (swap) is off (%s): hosts write here again", why)
        self.host_access(True)

    def _become_secondary(self, state: PairState, reason: str, kind: SwapKind) -> None:
        """Persist the secondary role (invariant 6), then stop and restart as secondaryd. The
        new primary starts a new generation: generation "" takes whatever it sends. Until
        then the swap is kept (swapped_out_*): if this step's answer is lost, the site that
        asked learns it from secondaryd (Swapped) and finishes the swap."""
        if self._copy_task is not None:
            self._copy_task.cancel()
        record, old = self.record, self.record.state
        record.role, record.state, record.reason = Role.SECONDARY, state, reason
        record.swapped_out_of, record.swapped_out_kind = record.generation, kind.value
        record.swapped_out_seq = self.store.last_seq
        record.generation = ""
        record.start_seq, record.copy_end_seq, record.copy_total_bytes = 1, 0, 0
        record.applied_seq = record.destage_intent_seq = 0
        record.svol_consistent = state is PairState.PAIR  # a takeover swap: volumes are equal
        record.svol_writable = record.written_while_split = False
        self._save_record()
        self.events.emit(
            old.value,
            state.value,
            f"{reason}: this site is the secondary now",
            new_role="secondary",
        )
        log.warning("%s: this site becomes the secondary", reason, extra=self._fields())
        self.switch_to = Role.SECONDARY
        asyncio.get_running_loop().call_later(SWITCH_DELAY_S, self.switching.set)

    def _after_swap(self) -> None:
        """First start as the primary after a swap (generation ""): a new generation; the
        master journal of an earlier stint here is dropped. From COPY the regions this site
        wrote as SSWS, and those the old primary reports, are copied."""
        state = self.record.state
        log.info("first start as the primary after a swap: new journal generation")
        self._new_generation(self._dirty_bytes())
        self.record.svol_consistent = state is PairState.PAIR
        self.journal.mode = _mode_for(state)
        self._save_record()

    async def _auto_resync(self) -> None:
        """pair.auto_resync: the link is back after a path-watch suspension."""
        await asyncio.sleep(0)  # after the Welcome went out
        try:
            result = self._resync(False, "by auto-resync (pair.auto_resync: the link is back)")
        except (ControlRefused, Refused) as exc:
            log.warning("auto-resync not done: %s", exc)
        else:
            log.info("auto-resync: %s", result["message"])

    def _new_generation(self, copy_total_bytes: int) -> None:
        """A journal discontinuity the secondary must follow: it drops what it has not
        applied (the bitmaps hold those regions) and takes the copy from start_seq."""
        self.store.reset(self.store.next_seq)
        self.record.generation = uuid.uuid4().hex[:16]
        self.record.start_seq = self.store.next_seq
        self.record.copy_end_seq = 0
        self.record.svol_consistent = False
        self.record.copy_total_bytes = copy_total_bytes
        self.record.svol_writable = self.record.written_while_split = False
        self.journal.host_marks = 0
        self.peer_written = False
        # The secondary reconnects to follow: the path watch counts its silence from now,
        # not from its last request (which a paused link may have made long ago).
        self.last_contact = time.monotonic()
        self._reported.clear()
        self._all_reported.clear()

    async def _wait_applied(self, seq: int, timeout_s: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.applied_seq < seq:
            if self.secondary is None or asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _bitmap_ranges(self) -> Ranges:
        """Marked runs per volume; empty when nothing is marked."""
        return {
            name: runs
            for name, b in self.bitmaps.items()
            if (runs := list(b.runs(max_run_bytes=64 << 20)))
        }

    def _dirty_bytes(self) -> int:
        return sum(b.dirty_bytes for b in self.bitmaps.values())

    def _secondary_state(self) -> PairState:
        return secondary_view(self.record.state, svol_writable=self.record.svol_writable)

    def _split_brain(self) -> bool:
        return self.peer_written and self.record.written_while_split

    def _check_split_brain(self, discard_secondary: bool) -> None:
        if not self.peer_written or discard_secondary:
            return
        if self._split_brain():
            raise ControlRefused(
                "cannot resync: split brain: hosts wrote both sites while the pair was split; "
                "`resync --discard-secondary` here keeps the primary's data, `resync --swap` "
                "on the secondary keeps the secondary's"
            )
        if not self.record.svol_writable:
            raise ControlRefused(
                "cannot resync: the secondary took over and hosts wrote it (SSWS); "
                "`resync --swap` on the secondary keeps its data, `resync --discard-secondary` "
                "here overwrites it"
            )

    def _suspend(self, state: PairState, reason: str) -> None:
        """Into a suspended state: what the secondary has not restored goes to the bitmaps,
        the journal is emptied, later writes are marked (invariant 2)."""
        if self._copy_task is not None and self._copy_task is not asyncio.current_task():
            self._copy_task.cancel()
        self._swap_off(f"the pair suspends: {reason}")
        self.journal.mode = Mode.BITMAP
        self._mark_unrestored()
        self.store.reset(self.store.next_seq)
        self._transition(state, reason)

    def _start_copy(self) -> None:
        assert self._tasks is not None
        self._copy_task = self._tasks.create_task(self._run_copy())

    async def _run_copy(self) -> None:
        """Journal every marked region: ours and, once it has reported, the secondary's."""
        await self._all_reported.wait()
        started = time.monotonic()
        copied = 0
        try:
            # Again while regions are marked: a report that came in during a pass.
            while self.journal.mode is Mode.JOURNAL and (ranges := self._bitmap_ranges()):
                await copy_volumes(
                    list(self.volumes.values()),
                    self.journal,
                    self.copy,
                    self._wait_for_space,
                    ranges,
                    copied=self._copied,
                )
                copied += self.copy.total_bytes
        except CopyAborted as exc:
            log.warning("copy stopped: %s", exc)
            return
        if self.journal.mode is not Mode.JOURNAL:
            return  # suspended meanwhile: the bitmaps keep what is left
        end_seq = self.store.last_seq
        self.record.copy_end_seq = end_seq
        self.record.copy_total_bytes = copied
        self._save_record()
        log.info(
            "copy: %d bytes journaled in %.1f s, copy ends at seq %d",
            copied,
            time.monotonic() - started,
            end_seq,
            extra=self._fields(seq=end_seq),
        )
        self._secondary_position(self.restored_seq, self.applied_seq)

    def _ref_sent(self, length: int) -> None:
        self.copy.advance(length)

    def _copied(self, volume: str, offset: int, length: int) -> None:
        # Journaled (with a seq the secondary will get): no longer a difference to track.
        if self.journal.mode is Mode.JOURNAL:
            self.bitmaps[volume].clear(offset, length)

    def _wait_for_space(self) -> asyncio.Future[None] | None:
        if self.store.used_bytes < self.store.capacity_bytes * COPY_WINDOW_FRACTION:
            return None
        if self._space_freed is None or self._space_freed.done():
            self._space_freed = asyncio.get_running_loop().create_future()
        return self._space_freed

    def _after_system_crash(self) -> None:
        """The machine went down (power loss, panic): writes not yet fdatasync'ed may have
        reached the P-VOL while their records did not reach the journal, and nothing tells
        which. Every region is marked for the resync, and the pair is suspended (PSUE)."""
        self._suspend_with_every_region_marked(
            "primary system crash: full resync needed",
            "this primary restarted after a system crash (new boot id): the journal may miss "
            "writes that reached the volumes; suspending the pair, every region marked for "
            "resync",
        )

    def _suspend_with_every_region_marked(self, reason: str, why: str) -> None:
        """What changed since the secondary's last position is unknown: mark everything,
        PSUE (a state that is already suspended stays, its bitmaps now full)."""
        log.error("%s", why)
        self.journal.mode = Mode.BITMAP
        for bitmap in self.bitmaps.values():
            bitmap.mark_all()
        self.store.reset(self.store.next_seq)
        if journals_writes(self.record.state):
            state = next_state(Role.PRIMARY, self.record.state, PairInput.LINK_LOST)
            self._transition(state, reason)
        else:
            self._save_bitmaps()

    def _journal_full(self) -> None:
        self._suspend(self.record.next_state(PairInput.JOURNAL_FULL), "journal full")

    def _journal_failed(self, why: str) -> None:
        """The journal disk failed a write or an fdatasync (full, I/O error): replication
        stops, host I/O does not (invariant 4)."""
        log.error(
            "%s: suspending the pair; host writes go on, marked for the resync",
            why,
            extra=self._fields(),
        )
        self._suspend(self.record.next_state(PairInput.LINK_LOST), f"journal disk error: {why}")

    def _mark_unrestored(self) -> None:
        """Records the secondary has not made durable go to the bitmap before the journal is
        dropped (invariant 2). Records that cannot be read back leave nothing to go by:
        every region is marked."""
        try:
            for entry in self.store.iter_entries(self.restored_seq + 1):
                self.bitmaps[entry.volume].mark(entry.offset, entry.length)
        except (JournalCorrupt, OSError) as exc:
            log.error(
                "cannot read the journal back to mark what the secondary lacks (%s): every "
                "region is marked for the resync",
                exc,
            )
            for bitmap in self.bitmaps.values():
                bitmap.mark_all()

    def _transition(self, state: PairState, reason: str, **extra: Any) -> None:
        old = self.record.state
        self.record.state, self.record.reason = state, reason
        self._save_record()
        self.journal.mode = _mode_for(state)
        self.events.emit(old.value, state.value, reason, **extra)

    def _save_record(self) -> None:
        self._save_bitmaps()
        self._saver.save_now(self.record)

    def _save_bitmaps(self) -> None:
        # "Written while split" is persisted before the mark log that proves it is emptied.
        if self.journal.host_marks and not self.record.written_while_split:
            self.record.written_while_split = True
            log.info("hosts write the P-VOLs while the pair is split")
            self._saver.save_now(self.record)
        save_bitmaps(self.config.data_dir, self.bitmaps)
        self.marks.saved()

    def _check_secondary_volumes(self, verb: str) -> None:
        if self.secondary is None:
            raise ControlRefused(
                f"cannot {verb}: no secondary is connected (is secondaryd running, with "
                f"primary: pointing at {self.config.replication_listen}?)"
            )
        theirs = {v.name: v.size for v in self.secondary.volumes}
        for volume in self.volumes.values():
            size = theirs.get(volume.name)
            if size is None:
                raise ControlRefused(f"cannot {verb}: the secondary has no volume {volume.name}")
            if size != volume.size:
                raise ControlRefused(
                    f"cannot {verb}: volume {volume.name} is {volume.size} bytes on the primary "
                    f"but {size} bytes on the secondary"
                )

    def _volume_descs(self) -> tuple[VolumeDesc, ...]:
        return tuple(VolumeDesc(v.name, v.size) for v in self.volumes.values())

    def _lag_bytes(self) -> int:
        start = max(self.applied_seq + 1, self.store.first_seq)
        return self.store.bytes_between(start) if start <= self.store.last_seq else 0

    def _lag_seconds(self) -> float:
        # The oldest record not applied yet; when its segment is already released (restored
        # but not applied), the oldest held record's age is the best lower bound we have.
        seq = max(self.applied_seq + 1, self.store.first_seq)
        if seq > self.store.last_seq:
            return 0.0
        stamp = self.store.timestamp_ns_of(seq)
        return max(0.0, (time.time_ns() - stamp) / 1e9) if stamp else 0.0


def _mode_for(state: PairState) -> Mode:
    if journals_writes(state):
        return Mode.JOURNAL
    return Mode.OFF if state is PairState.SMPL else Mode.BITMAP


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
