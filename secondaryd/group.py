"""The secondary side of one journal group: restore journal, destager, the pair as seen here.

puller ── welcomed(generation, start_seq) ──► new generation: leave SSWS (read-only again),
                                              mark what is restored but not applied in the
                                              bitmaps, reset the restore journal, persist
       ── bitmap_reports() ──► the bitmaps go to the primary; cleared here once it has them
       ── received(batch) ──► append to the restore journal ─► fdatasync ─► restored
                              ─► destager.kick()      state ◄── batch.state (COPY, PAIR...)
                              SSWS (split --rw): destage everything, then hosts may write
display ◄── restored / applied / the primary's last seq and clock

While SSWS (split --rw, takeover) the link stays up for status only: no record is applied,
and Hello tells the primary this site is SSWS (a primary that missed the takeover suspends).

A swap whose last answer was lost: the old primary answers Hello with Swapped
(secondaryd.swapped), and peer_swapped() finishes the swap here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from common.bitmap import load_bitmaps, save_bitmaps
from common.config import Config
from common.control import ControlRefused
from common.events import EventLog
from common.journal.record import CorruptRecord, Entry, TruncatedRecord, iter_records
from common.journal.store import JournalStore
from common.linksecurity import load_link_security
from common.marklog import MarkLog
from common.pairrecord import PairRecord, RecordSaver
from common.pairstate import PairInput, PairState, Refused, Role, is_suspended, next_state
from common.progress import RateMeter
from common.replication.linkstats import LinkStats
from common.replication.messages import (
    JournalBatch,
    ReportBitmap,
    SwapAnswer,
    SwapKind,
    Swapped,
    SwapRequest,
    VolumeDesc,
    Welcome,
)
from common.volume import Volume
from secondaryd.destager import Destager
from secondaryd.puller import LinkDown, SwapLinkDropped, SwapRefused, pull_forever
from secondaryd.writable import BitmapMarker

log = logging.getLogger("journalpair.secondary")

BITMAP_SAVE_S = 1.0
SWAP_ANSWER_S = 30.0  # the primary answers a swap step within this, or the swap is off
SWAP_DRAIN_S = 60.0  # a takeover swap applies the primary's last writes within this
SWITCH_DELAY_S = 0.2  # lets pairctl's answer out before the daemon restarts in its new role
WATCH_S = 0.1  # how often the path watch looks at the primary's silence
LINK_LOST = "link lost"


class SecondaryGroup:
    def __init__(
        self,
        config: Config,
        volumes: Mapping[str, Volume],
        store: JournalStore,
        record: PairRecord,
        events: EventLog,
    ) -> None:
        self.config = config
        self.group = config.group
        self.path_watch_s = config.pair.path_watch_s
        self.volumes_by_name = volumes
        self.volumes = tuple(VolumeDesc(v.name, v.size) for v in volumes.values())
        self.store = store
        self.record = record
        self.events = events
        self.saver = RecordSaver(config.data_dir)
        self.destager = Destager(store, volumes, record, self.saver, self._destaging_failed)
        # Why this site can no longer store or apply the journal; told to the primary in the
        # next Hello (it suspends), cleared once it has suspended.
        self.storage_failure = ""
        self._damaged_seq = 0  # first seq of the last batch that failed its checks
        self.restored_seq = store.last_seq
        self.primary_last_seq = store.last_seq
        self.primary_clock_offset_ns = 0
        self.copy_done_bytes = 0
        self.copy_total_bytes = 0
        self.copy_meter = RateMeter()  # for display's copy rate and ETA
        self.primary_sent_state = ""  # the state the primary's last answer told this site
        self._syncing: asyncio.Future[None] | None = None
        self._straight_upto = 0  # the last seq written straight onto the S-VOLs
        self.bitmaps = load_bitmaps(
            config.data_dir, {n: v.size for n, v in volumes.items()}, config.pair.bitmap_region
        )
        self.mark_log = MarkLog(config.data_dir / "bitmaps", self.bitmaps)
        self.marker = BitmapMarker(self.mark_log)
        if self.mark_log.replay() and record.state is PairState.SSWS:
            self.marker.marks += 1  # host writes marked just before an unclean stop
        self.save_bitmaps()
        self.on_writable: list[Callable[[BitmapMarker], None]] = []
        self.on_read_only: list[Callable[[], None]] = []
        self._task_group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pulling: asyncio.Task[None] | None = None
        self._destaging: asyncio.Task[None] | None = None
        self._ignored_records = 0
        self._following = True  # this site is in the primary's generation (else status only)
        self._standby_why = ""
        self._asking: tuple[SwapRequest, asyncio.Future[SwapAnswer]] | None = None
        self.switch_to: Role | None = None  # a swap made this site the primary
        self.switching = asyncio.Event()
        # The old primary took the last step of a swap this site asked for (its answer was
        # lost) while this site was SSWS: resync --swap here finishes it without asking.
        self.swapped_peer: Swapped | None = None
        # This site, once made the secondary by a swap, has joined the new primary's
        # generation (or left the swap behind): no need to answer Hello with Swapped.
        self.swap_settled = asyncio.Event()
        if not record.swapped_out_of:
            self.swap_settled.set()
        self.link_up = False
        self.link_stats = LinkStats()  # counted by the puller (metrics)
        self.link_why = "not connected yet"
        self.link_since = time.time()
        self.last_answer = time.monotonic()  # the primary's last bytes (path watch)

    def recover(self) -> None:
        held = self.store.last_seq >= self.store.first_seq
        if not self.record.generation and (held or self.record.applied_seq != self.store.last_seq):
            # A swap made this site the secondary: a restore journal from an earlier stint
            # here must not reach the volumes, and its position is where destaging starts
            # (an empty one at seq N is not at the 0 the swap persisted); the new primary's
            # generation starts afresh.
            self._drop_restore_journal()
        self.destager.recover()

    def _drop_restore_journal(self) -> None:
        """Records not applied yet are dropped (delete, or an earlier generation's journal):
        the S-VOLs stay the exact prefix they hold."""
        dropped = self.store.last_seq - self.destager.applied_seq
        if dropped > 0:
            log.info("dropping %d restore-journal records not applied", dropped)
        self.store.reset(self.store.next_seq)
        self.record.applied_seq = self.record.destage_intent_seq = self.store.last_seq
        self.saver.save_now(self.record)
        self.restored_seq = self.primary_last_seq = self.store.last_seq
        self.destager.reset(self.store.last_seq)

    @property
    def writable(self) -> bool:
        """Hosts write the S-VOLs (SSWS): no pulling, writes marked in the bitmaps."""
        return self.record.state is PairState.SSWS

    async def run(self, tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """Start pulling, and destaging unless SSWS; returns the tasks, for the service to
        cancel."""
        self._task_group = tasks
        self._tasks = [
            tasks.create_task(self._save_bitmaps_forever()),
            tasks.create_task(self._watch_path()),
        ]
        if not self.writable:
            self._start_destaging()
        self._start_pulling()
        return self._tasks

    def _start_pulling(self) -> None:
        assert self._task_group is not None and self.config.primary is not None
        self._pulling = self._task_group.create_task(
            pull_forever(self.config.primary, self, load_link_security(self.config.link))
        )
        self._tasks.append(self._pulling)

    def _start_destaging(self) -> None:
        assert self._task_group is not None
        self.destager.kick()
        self._destaging = self._task_group.create_task(self.destager.run())
        self._tasks.append(self._destaging)

    async def takeover(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """horctakeover: a swap when the primary answers (exit code 1), else the primary site
        is lost: destage everything restored, and let hosts write the S-VOLs (SSWS, exit
        code 2)."""
        if self.link_up:
            return await self._takeover_swap()
        try:
            state = next_state(
                Role.SECONDARY,
                self.record.state,
                PairInput.TAKEOVER_SSWS,
                svol_consistent=self.record.svol_consistent,
            )
        except Refused as exc:
            raise ControlRefused(str(exc)) from None
        # No new record may come in while the last ones are destaged: pulling restarts in
        # SSWS, where it only keeps the link (and tells a returning primary).
        if self._pulling is not None:
            self._pulling.cancel()
        applied = await self._become_writable(state, "takeover: the primary does not answer")
        self._start_pulling()
        return {
            "message": f"takeover: the S-VOLs are read-write (SSWS), consistent at seq {applied}",
            "exit_code": 2,
        }

    async def resync(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """Only `resync --swap` runs here (SSWS): this site becomes the primary and copies
        what either site changed to the old primary, which becomes its secondary."""
        if not args.get("swap"):
            raise ControlRefused("cannot resync here: run resync on the primary, or resync --swap")
        state = self.record.next_state(PairInput.RESYNC_SWAP)
        swapped = self.swapped_peer
        if swapped is not None and swapped.generation == self.record.generation:
            self._become_primary(
                state,
                f"resync --swap by operator; the old primary is the secondary already "
                f"({_swap_name(swapped)} at seq {swapped.last_seq})",
            )
        else:
            self._check_can_be_primary("resync --swap")
            try:
                await self._ask(SwapKind.RESYNC)
            except SwapAnswerLost as exc:
                raise ControlRefused(
                    f"{exc.reason}. The old primary may have become the secondary (its log "
                    "says `this site becomes the secondary`): this site then finishes the "
                    "resync --swap as soon as it reaches it again (watch `pairctl display`)"
                ) from None
            self._become_primary(state, "resync --swap by operator")
        return {
            "message": f"pair {self.group}: this site is the primary now (COPY): it copies what "
            "either site changed to the old primary, its secondary"
        }

    async def _takeover_swap(self) -> Mapping[str, Any]:
        """The primary answers: it stops host writes, this site applies all of them, then
        the roles swap. No acknowledged write is lost."""
        state = self.record.next_state(PairInput.TAKEOVER_SWAP)
        self._check_can_be_primary("takeover")
        last = await self._ask(SwapKind.TAKEOVER)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SWAP_DRAIN_S
        while self.destager.applied_seq < last.last_seq:
            if loop.time() > deadline or self.destager.error or not self.link_up:
                raise ControlRefused(
                    f"cannot takeover: applied only up to seq {self.destager.applied_seq} of "
                    f"{last.last_seq}; the primary lets hosts write again after a while"
                )
            self.destager.kick()
            await asyncio.sleep(0.01)
        await self.destager.checkpoint()
        try:
            await self._ask(SwapKind.COMMIT)
        except SwapAnswerLost as exc:
            raise ControlRefused(
                f"{exc.reason}. The old primary may have taken COMMIT and become the secondary "
                "(its log says `this site becomes the secondary`): this site then finishes the "
                "swap as soon as it reaches it again (watch `pairctl display` or the events). "
                "If that site is lost, `takeover` again makes this site SSWS with every write "
                f"up to seq {last.last_seq}"
            ) from None
        self._become_primary(state, f"takeover (swap) by operator at seq {last.last_seq}")
        return {
            "message": f"takeover (swap): this site is the primary now, with every write up to "
            f"seq {last.last_seq}; the old primary is its secondary",
            "exit_code": 1,
        }

    def _check_can_be_primary(self, verb: str) -> None:
        if self.config.replication_listen is None:
            raise ControlRefused(
                f"cannot {verb}: this site cannot become the primary: its config has no "
                "listen.replication address"
            )
        if not self.link_up:
            raise ControlRefused(f"cannot {verb}: the primary does not answer ({self.link_why})")

    async def _ask(self, kind: SwapKind) -> SwapAnswer:
        """One swap step, sent by the pull loop before its next request."""
        if self._asking is not None:
            raise ControlRefused(f"cannot {kind.value}: another swap step is under way")
        answered: asyncio.Future[SwapAnswer] = asyncio.get_running_loop().create_future()
        self._asking = (SwapRequest(kind), answered)
        try:
            async with asyncio.timeout(SWAP_ANSWER_S):
                return await answered
        except SwapLinkDropped as exc:
            raise SwapAnswerLost(f"the primary refused the swap: {exc}") from None
        except SwapRefused as exc:
            raise ControlRefused(f"the primary refused the swap: {exc}") from None
        except TimeoutError:
            raise SwapAnswerLost(
                f"the primary did not answer the swap in {SWAP_ANSWER_S:.0f} s"
            ) from None
        finally:
            self._asking = None

    def next_request(self) -> tuple[SwapRequest, asyncio.Future[SwapAnswer]] | None:
        asking = self._asking
        return asking if asking is not None and not asking[1].done() else None

    def _become_primary(self, state: PairState, reason: str) -> None:
        """Persist the primary role (invariant 6), then stop and restart as primaryd, which
        starts a new generation (generation "")."""
        record, old = self.record, self.record.state
        record.role, record.state, record.reason = Role.PRIMARY, state, reason
        record.generation = ""
        self._forget_swapped_out()
        record.start_seq, record.copy_end_seq, record.copy_total_bytes = 1, 0, 0
        record.svol_consistent = state is PairState.PAIR
        record.svol_writable = record.written_while_split = False
        self.save_bitmaps()  # what hosts wrote here (SSWS): the new primary copies it
        self.saver.save_now(record)
        self.events.emit(
            old.value, state.value, f"{reason}: this site is the primary now", new_role="primary"
        )
        log.warning("%s: this site becomes the primary", reason, extra=self._fields())
        self.switch_to = Role.PRIMARY
        asyncio.get_running_loop().call_later(SWITCH_DELAY_S, self.switching.set)

    async def _become_writable(self, state: PairState, reason: str) -> int:
        """Everything restored goes onto the S-VOLs, then SSWS is persisted and hosts may
        write (each write marked in the bitmaps). Returns the seq the S-VOLs hold."""
        while self.destager.applied_seq < self.store.durable_seq and not self.destager.error:
            self.destager.kick()
            await asyncio.sleep(0.01)
        await self.destager.checkpoint()
        if self._destaging is not None:
            self._destaging.cancel()
            self._destaging = None
        applied = self.destager.applied_seq
        old = self.record.state
        self.record.state, self.record.reason = state, reason
        # Hosts write here now: the other site must not finish a swap that made this site
        # the secondary and become the primary over these writes.
        self._forget_swapped_out()
        self.saver.save_now(self.record)
        self.events.emit(old.value, state.value, reason, applied_seq=applied)
        for hook in self.on_writable:
            hook(self.marker)
        log.info(
            "the S-VOLs are writable (SSWS), consistent at seq %d: %s",
            applied,
            reason,
            extra=self._fields(seq=applied),
        )
        return applied

    def _forget_swapped_out(self) -> None:
        """This site no longer waits to follow the site its swap made the primary (the
        caller persists the record)."""
        record = self.record
        if record.swapped_out_of:
            log.info(
                "no longer answering as the old primary of generation %s", record.swapped_out_of
            )
        record.swapped_out_of, record.swapped_out_seq, record.swapped_out_kind = "", 0, ""
        self.swap_settled.set()

    def _leave_writable(self, why: str) -> None:
        """SSWS ends (a resync from the primary): hosts lose write access first, then what
        they wrote (marked in the bitmaps) is saved and handed over to the primary."""
        for hook in self.on_read_only:
            hook()
        self.save_bitmaps()
        log.info("the S-VOLs are read-only again: %s", why)

    async def _watch_path(self) -> None:
        """No answer from the primary for path_watch_s while paired: PSUE here too (the
        primary suspends likewise). A primary that did not suspend is followed again once
        it answers."""
        while True:
            await asyncio.sleep(WATCH_S)
            silent_s = time.monotonic() - self.last_answer
            watch_s = self.config.pair.path_watch_s
            if self.switch_to is not None:
                return  # the record is the other role's now, and the link long silent
            if not self.record.generation:
                continue  # a swap made this site the secondary: no primary to watch yet
            if self.record.state in _WATCHED and silent_s > watch_s:
                self._mirror(
                    PairState.PSUE,
                    f"{LINK_LOST}: no answer from the primary for {silent_s:.1f} s "
                    f"(path_watch_s {watch_s:g}): "
                    + ("the connection is open but silent" if self.link_up else self.link_why),
                )

    async def _save_bitmaps_forever(self) -> None:
        while True:
            await asyncio.sleep(BITMAP_SAVE_S)
            self.save_bitmaps()

    def save_bitmaps(self) -> None:
        # "Written while SSWS" is persisted before the mark log that proves it is emptied.
        if self.writable and self.marker.marks and not self.record.written_while_split:
            self.record.written_while_split = True
            log.info("hosts write the S-VOLs (SSWS)")
            self.saver.save_now(self.record)
        save_bitmaps(self.config.data_dir, self.bitmaps)
        self.mark_log.saved()

    async def stop(self) -> None:
        if not self.writable:
            await self.destager.checkpoint()
        self.save_bitmaps()
        self.mark_log.close()

    # -- PullSink -------------------------------------------------------------------------

    def position(self) -> tuple[str, int, int]:
        # The destager may run ahead of the last restore-journal sync; never report more
        # applied than restored (the primary holds both until restored moves).
        applied = min(self.destager.applied_seq, self.restored_seq)
        return self.record.generation, self.restored_seq, applied

    def waits_for_new_primary(self) -> bool:
        """A swap made this site the secondary and the new primary has not been heard yet:
        it is starting, and its path watch counts from then (reconnect soon)."""
        return not self.record.generation and self.record.state is not PairState.SMPL

    def hello_state(self) -> tuple[str, bool]:
        written = self.record.written_while_split or (self.writable and self.marker.marks > 0)
        return self.record.state.value, written

    async def welcomed(self, welcome: Welcome) -> int:
        self._not_switching()
        self._check_primary_site(welcome)
        self.last_answer = time.monotonic()
        self._following = True
        state = _state_named(welcome.state)
        if self.storage_failure and state is not None and is_suspended(state):
            log.info("the primary suspended the pair (%s) after this site's failure", state.value)
            self.storage_failure = ""
        new_generation = welcome.generation != self.record.generation
        if self.writable and not (new_generation and state is PairState.COPY):
            return self.restored_seq + 1  # SSWS: the link carries status only
        if new_generation and state is not PairState.SMPL:
            if not self._can_join(welcome, state):
                self._following = False
                self._standby_why = (
                    f"the primary is {welcome.state} in generation {welcome.generation}, which "
                    "this site never copied: resync (or delete and create) on the primary"
                )
                log.warning("%s", self._standby_why)
                return self.restored_seq + 1  # status only, nothing applied
            if self.writable:
                self._leave_writable(f"the primary resyncs (generation {welcome.generation})")
            await self._new_generation(welcome)
        if state is not None:
            await self._follow(state)
        return self.restored_seq + 1

    def _check_primary_site(self, welcome: Welcome) -> None:
        """Paired, this site follows only the primary site it was paired with: another
        primaryd claiming the group at that address (a rebuilt host, a copied config) must
        not make it leave the pair, or a takeover would no longer be possible."""
        record = self.record
        known = record.peer_site_id
        if not welcome.site_id or record.state is PairState.SMPL:
            return
        if not known:
            record.peer_site_id = welcome.site_id
            self.saver.save_now(record)
            return
        if welcome.site_id != known:
            raise LinkDown(
                f"refused the primary: it is site {welcome.site_id}, this site is paired "
                f"with site {known} (another primaryd claims group {self.group}); this site "
                f"stays {record.state.value}. To pair with the new one: stop secondaryd, "
                f"move {self.config.data_dir}/pair.json aside, start it, create the pair"
            )

    def _can_join(self, welcome: Welcome, state: PairState | None) -> bool:
        """A new generation is joined from its start: a copy (COPY), or, right after a
        takeover swap (generation "" and PAIR here), the volumes both sites hold."""
        if state is PairState.COPY:
            return True
        swapped = not self.record.generation and self.record.state is PairState.PAIR
        return swapped and state in (PairState.PAIR, PairState.PFUL)

    def _not_switching(self) -> None:
        """A swap made this site the primary; it restarts as primaryd in a moment. Until
        then the old primary (a primaryd for a moment more) is not followed: its Welcome has
        no generation ("none"), and taking that for one to join would persist it, so the new
        primary would not start a generation of its own (it keys on generation "") and would
        offer its old master journal from seq 1; nor are this site's bitmaps handed over:
        the new primary copies from them."""
        if self.switch_to is not None:
            raise LinkDown("this site is becoming the primary: not following the old one")

    def peer_swapped(self, swapped: Swapped) -> str:
        """The primary's site answered Hello with Swapped: a swap step this site asked for
        made it the secondary, and the answer was lost. Finish the swap: at once when hosts
        write neither site (a takeover whose COMMIT answer was lost; a resync --swap), or at
        `resync --swap` when this site took over since (SSWS: its hosts would lose their
        connections). Returns what the link shows."""
        record = self.record
        told = (
            f"the old primary is the secondary since the {_swap_name(swapped)} at seq "
            f"{swapped.last_seq}"
        )
        if self.switch_to is not None:
            return "this site is becoming the primary"
        if record.state is PairState.SMPL or swapped.generation != record.generation:
            return (
                f"the primary's site is a secondary: a swap out of generation "
                f"{swapped.generation} made it so, which this site (generation "
                f"{record.generation or 'none'}) did not ask for"
            )
        if self.config.replication_listen is None:
            return f"{told}, but this site's config has no listen.replication to serve it on"
        if self.writable and swapped.kind is SwapKind.COMMIT:
            if self.swapped_peer is None:
                log.warning("%s: `resync --swap` here makes this site the primary", told)
            self.swapped_peer = swapped
            return (
                f"{told}: `resync --swap` here makes this site the primary and copies what "
                "hosts wrote here to it"
            )
        if swapped.kind is SwapKind.RESYNC:
            inp, why = PairInput.RESYNC_SWAP, "the answer to resync --swap was lost"
        elif self.destager.applied_seq < swapped.last_seq:  # not after a COMMIT from here
            return f"{told}, but this site applied only up to seq {self.destager.applied_seq}"
        else:
            inp, why = PairInput.SWAP_COMMITTED, "the answer to COMMIT was lost"
        try:
            state = record.next_state(inp)
        except Refused as exc:
            return f"{told}, but {exc}"
        self._become_primary(state, f"swap finished: {told} ({why})")
        return "this site is becoming the primary"

    def bitmap_reports(self, welcome: Welcome) -> list[ReportBitmap]:
        if self.writable or welcome.state == PairState.SMPL.value:
            return []  # SSWS: the S-VOLs still change; they are handed over when SSWS ends
        sizes = {v.name: v.size for v in welcome.volumes}
        return [
            ReportBitmap(self.record.generation, name, bitmap.to_bytes())
            for name, bitmap in self.bitmaps.items()
            if sizes.get(name) == bitmap.volume_size  # else the primary refuses to pair
        ]

    def bitmap_taken(self, report: ReportBitmap) -> None:
        bitmap = self.bitmaps[report.volume]
        if bitmap.dirty_regions and not self.writable:
            log.info(
                "volume %s: %d changed bytes handed over to the primary",
                report.volume,
                bitmap.dirty_bytes,
            )
            bitmap.clear_all()
            self.save_bitmaps()

    async def received(self, batch: JournalBatch) -> None:
        self._not_switching()
        self.last_answer = time.monotonic()
        if self.storage_failure:  # drop the link: the next Hello tells the primary
            raise LinkDown(f"secondary failure: {self.storage_failure}")
        self.primary_sent_state = batch.state
        if not self._following:
            self.primary_last_seq = batch.last_seq
            return
        if self.writable:
            if batch.count and not self._ignored_records:
                log.warning("SSWS: ignoring %d records the primary sent", batch.count)
            self._ignored_records += batch.count
            return
        if batch.count:
            try:
                await self._store(batch)
            except OSError as exc:
                self._storage_failed(f"cannot store the journal from seq {batch.first_seq}: {exc}")
                raise LinkDown(f"secondary failure: {self.storage_failure}") from None
            except CorruptRecord as exc:
                self._damaged_batch(batch, exc)
        self.primary_last_seq = batch.last_seq
        self.primary_clock_offset_ns = batch.primary_time_ns - time.time_ns()
        self.copy_done_bytes, self.copy_total_bytes = batch.copy_done_bytes, batch.copy_total_bytes
        self.copy_meter.update(batch.copy_done_bytes, time.monotonic())
        state = _state_named(batch.state)
        if state is not None:
            await self._follow(state)

    async def _store(self, batch: JournalBatch) -> None:
        """Into the restore journal, or straight onto the S-VOLs during COPY; OSError when
        the disk fails."""
        # One batch is synced while the next is fetched: `restored` (which lets the
        # primary free space) moves only once its records are durable here.
        straight = self._continues_straight(batch)
        if not straight:
            if self._syncing is not None:
                await self._syncing
            if self.storage_failure:  # that sync failed
                raise LinkDown(f"secondary failure: {self.storage_failure}")
            straight = self._copying_straight(batch)
        if straight:
            entries = _checked_entries(batch)
            self.destager.apply(entries)
            self._straight_upto = entries[-1].seq
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.ensure_future(self._sync_applied())
        else:
            self.store.append_blob(batch.first_seq, batch.records, batch.count)
            self._syncing = asyncio.ensure_future(self._sync_restore_journal())

    def heard(self) -> None:
        self.last_answer = time.monotonic()  # a 16 MiB answer on a slow link is not silence

    def link(self, up: bool, why: str) -> None:
        if up and not self._following:
            why = f"{why}; {self._standby_why}"
        # One line per change of state or of reason: a dead primary retried every few
        # seconds does not flood the log, a new kind of failure is always told.
        if up != self.link_up or why != self.link_why:
            level = logging.INFO if up else logging.WARNING
            log.log(level, "link %s: %s", "up" if up else "down", why, extra=self._fields())
        if up != self.link_up:
            self.link_since = time.time()
        self.link_up, self.link_why = up, why

    def _fields(self, **more: Any) -> dict[str, Any]:
        """The log fields of this group (common.logsetup.FIELDS)."""
        return {
            "group": self.group,
            "role": Role.SECONDARY.value,
            "state": self.record.state.value,
            **more,
        }

    # -- display -------------------------------------------------------------------------

    def display(self) -> dict[str, Any]:
        applied = self.destager.applied_seq
        lag_entries = max(0, self.primary_last_seq - applied)
        result: dict[str, Any] = {
            "group": self.group,
            "role": Role.SECONDARY.value,
            "state": self.record.state.value,
            "reason": self.record.reason,
            "generation": self.record.generation,
            "volumes": [
                {"name": v.name, "size": v.size, "path": str(v.path)}
                for v in self.volumes_by_name.values()
            ],
            "lag": {
                "entries": lag_entries,
                "bytes": self._lag_bytes(applied) if lag_entries else 0,
                "seconds": self._lag_seconds(applied) if lag_entries else 0.0,
            },
            "journal": {
                "used_bytes": self.store.used_bytes,
                "capacity_bytes": self.store.capacity_bytes,
            },
            "seq": {
                "primary_last": self.primary_last_seq,
                "restored": self.restored_seq,
                "applied": applied,
            },
            "link": {
                "up": self.link_up,
                "peer": f"{self.config.primary.host}:{self.config.primary.port}"
                if self.config.primary
                else "",
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.link_since)),
                "for_s": round(max(0.0, time.time() - self.link_since), 1),
                "why": self.link_why,
            },
            "peer": {  # what this site knows of the primary, from its last answer
                "sent_state": self.primary_sent_state,
                "last_seq": self.primary_last_seq,
                "silent_s": round(max(0.0, time.monotonic() - self.last_answer), 1),
            },
        }
        result["bitmap"] = {"dirty_bytes": sum(b.dirty_bytes for b in self.bitmaps.values())}
        if self.destager.error:
            result["destage_error"] = self.destager.error
        if self.record.state is PairState.COPY:
            now_s = time.monotonic()
            rate = self.copy_meter.rate_bytes_per_s(now_s)
            eta_s = self.copy_meter.eta_s(self.copy_total_bytes, now_s)
            result["copy"] = {
                "done_bytes": self.copy_done_bytes,
                "total_bytes": self.copy_total_bytes,
                "rate_bytes_per_s": None if rate is None else round(rate),
                "eta_s": None if eta_s is None else round(eta_s, 1),
            }
        return result

    # -- internals -------------------------------------------------------------------------

    async def _new_generation(self, welcome: Welcome) -> None:
        if self._syncing is not None:  # it would move the new journal to the old seqs
            await self._syncing
        log.info(
            "primary has generation %s (here: %s): restore journal restarts at seq %d",
            welcome.generation,
            self.record.generation or "none",
            welcome.start_seq,
        )
        self._mark_unapplied()
        self.store.reset(welcome.start_seq)
        self.restored_seq = welcome.start_seq - 1
        self.destager.reset(welcome.start_seq - 1)
        record = self.record
        record.generation = welcome.generation
        record.peer_site_id = welcome.site_id
        self._forget_swapped_out()
        record.start_seq = welcome.start_seq
        record.applied_seq = record.destage_intent_seq = welcome.start_seq - 1
        record.svol_consistent = False
        record.written_while_split = False
        self.marker.marks = 0
        await self.saver.save(record)
        if self._task_group is not None and (self._destaging is None or self._destaging.done()):
            self.destager.error = None  # stopped by a disk error, repaired since
            self._start_destaging()

    def _mark_unapplied(self) -> None:
        """Records restored here but not on the S-VOLs yet are dropped with the old journal:
        the primary released them, so only this bitmap keeps their regions for the copy."""
        marked = 0
        for entry in self.store.iter_entries(self.destager.applied_seq + 1):
            self.bitmaps[entry.volume].mark(entry.offset, entry.length)
            marked += 1
        if marked:
            log.info(
                "%d restored records not applied yet are dropped, their regions marked", marked
            )
            self.save_bitmaps()

    def _copying_straight(self, batch: JournalBatch) -> bool:
        """During COPY the S-VOLs are not consistent anyway: once everything before the batch
        is applied and checkpointed, its records go straight onto the S-VOLs, written once
        instead of twice (restore journal, then volume). `restored` then moves when the
        S-VOLs are durable; a crash before that makes the primary send them again."""
        record, store = self.record, self.store
        return (
            record.state is PairState.COPY
            and _state_named(batch.state) is PairState.COPY
            and self.destager.error is None
            and record.applied_seq
            == record.destage_intent_seq
            == self.destager.applied_seq
            == self.restored_seq
            == store.last_seq
            == batch.first_seq - 1
        )

    def _continues_straight(self, batch: JournalBatch) -> bool:
        """The batch follows batches written straight whose sync still runs: it goes
        straight too, and the running sync loop takes it along (writes and fdatasync
        overlap instead of alternating)."""
        return (
            self._syncing is not None
            and not self._syncing.done()
            and self._straight_upto == batch.first_seq - 1 > self.restored_seq
            and self.record.state is PairState.COPY
            and _state_named(batch.state) is PairState.COPY
            and self.destager.error is None
        )

    async def _sync_applied(self) -> None:
        """After batches went straight onto the S-VOLs: volumes durable, then applied_seq
        persisted, then the (empty) restore journal moves past them, then `restored`;
        again while more were written meanwhile."""
        while self._straight_upto > self.restored_seq and not self.storage_failure:
            last_seq = self._straight_upto
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.destager.sync_volumes)
            except OSError as exc:
                self._storage_failed(f"cannot fdatasync the S-VOLs: {exc}")
                return
            record = self.record
            record.applied_seq = record.destage_intent_seq = last_seq
            await self.saver.save(record)
            self.store.reset(last_seq + 1)
            self.destager.reset(last_seq)
            self.restored_seq = last_seq

    async def _sync_restore_journal(self) -> None:
        upto = self.store.last_seq
        try:
            ticket = self.store.prepare_sync()
            await asyncio.get_running_loop().run_in_executor(None, ticket.run)
        except OSError as exc:
            self._storage_failed(f"cannot write the restore journal durably: {exc}")
            return
        self.restored_seq = upto
        self.destager.kick()

    def _storage_failed(self, why: str) -> None:
        """The restore journal or an S-VOL disk failed (full, I/O error): this site stops
        taking the journal, suspends (PSUE) and tells the primary in its next Hello, which
        suspends too and marks what this site has not restored (invariant 4: never the
        hosts' problem). Records restored before the failure stay and are applied."""
        if not self.storage_failure:
            log.error(
                "%s: suspending the pair (PSUE); the primary marks what this site lacks; "
                "repair the disk, then resync on the primary",
                why,
            )
        self.storage_failure = why
        if self.record.state in (PairState.COPY, PairState.PAIR, PairState.PFUL):
            self._mirror(PairState.PSUE, f"secondary failure: {why}")

    def _damaged_batch(self, batch: JournalBatch, exc: CorruptRecord) -> NoReturn:
        """A batch that fails its checks is fetched again once (the link may have damaged
        it); damaged twice at the same seq, the primary's journal holds the damage: the
        pair suspends (the primary marks every region it cannot read back)."""
        why = f"the primary sent a damaged record from seq {batch.first_seq}: {exc}"
        if self._damaged_seq != batch.first_seq:
            self._damaged_seq = batch.first_seq
            log.warning("%s; fetching it again", why)
            raise LinkDown(why)
        self._storage_failed(f"{why} (twice)")
        raise LinkDown(f"secondary failure: {self.storage_failure}")

    def _destaging_failed(self, error: str) -> None:
        self._storage_failed(f"cannot apply the journal to the S-VOLs: {error}")

    async def _follow(self, state: PairState) -> None:
        """Take the state the primary gives this site."""
        if state is not PairState.SSWS:
            self._mirror(state, f"primary is {_primary_name(state)}")
        elif not self.writable:
            if self._syncing is not None:
                await self._syncing
            await self._become_writable(state, "split --rw on the primary")

    def _mirror(self, state: PairState, reason: str) -> None:
        old = self.record.state
        if old is state:
            if state is PairState.PAIR and not self.record.svol_consistent:
                self.record.svol_consistent = True  # a takeover swap's new generation
                self.saver.save_now(self.record)
            return
        self.record.state, self.record.reason = state, reason
        if state is PairState.PAIR:
            self.record.svol_consistent = True
        if state is PairState.SMPL:  # deleted: nothing to resync, nothing more to apply
            for bitmap in self.bitmaps.values():
                bitmap.clear_all()
            self.save_bitmaps()
            self.record.written_while_split = False
            self._drop_restore_journal()
        self.saver.save_now(self.record)
        self.events.emit(old.value, state.value, reason)

    def _lag_bytes(self, applied: int) -> int:
        start = max(applied + 1, self.store.first_seq)
        return self.store.bytes_between(start) if start <= self.store.last_seq else 0

    def _lag_seconds(self, applied: int) -> float:
        seq = applied + 1
        if not self.store.first_seq <= seq <= self.store.last_seq:
            return 0.0
        stamp = self.store.timestamp_ns_of(seq)
        if not stamp:
            return 0.0
        primary_now = time.time_ns() + self.primary_clock_offset_ns
        return max(0.0, (primary_now - stamp) / 1e9)


_WATCHED = (PairState.COPY, PairState.PAIR, PairState.PFUL)


def _checked_entries(batch: JournalBatch) -> list[Entry]:
    """The batch's records, crcs checked, in exactly the seqs it says (else CorruptRecord)."""
    try:
        entries = list(iter_records(batch.records))
    except TruncatedRecord as exc:
        raise CorruptRecord(f"batch ends inside a record: {exc}") from None
    seqs = [entry.seq for entry in entries]
    if seqs != list(range(batch.first_seq, batch.first_seq + batch.count)):
        raise CorruptRecord(f"batch from seq {batch.first_seq} holds seqs {seqs[:3]}...")
    return entries


def _primary_name(state: PairState) -> str:
    return "PSUS" if state is PairState.SSUS else state.value


def _state_named(name: str) -> PairState | None:
    try:
        return PairState(name)
    except ValueError:
        return None


class SwapAnswerLost(ControlRefused):
    """A swap step went out and no answer came back: the primary may have taken it."""


def _swap_name(swapped: Swapped) -> str:
    return "takeover (swap)" if swapped.kind is SwapKind.COMMIT else "resync --swap"
