"""What both role services share at start and stop: volumes, state, journal, control socket."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from common.config import Config, ConfigError
from common.control import ControlRefused, ControlServer, Handler
from common.daemon import StartupError
from common.displaytext import human_size
from common.events import EventLog
from common.hooks import HookRunner
from common.iscsi.credentials import load_chap
from common.iscsi.server import IscsiServer
from common.journal.store import JournalCorrupt, JournalStore
from common.metrics.collector import GroupCollector, MetricsSource
from common.metrics.server import MetricsServer
from common.nbd.server import NbdServer, WriteJournal
from common.pairrecord import FILE_NAME as PAIR_FILE_NAME
from common.pairrecord import PairRecord, PairRecordError, RecordSaver
from common.pairstate import Role
from common.sdnotify import notify
from common.statefile import write_bytes_atomic
from common.volume import Volume

log = logging.getLogger("journalpair")


def open_volumes(config: Config, *, read_only: bool) -> dict[str, Volume]:
    return {
        v.name: Volume.open_or_create(v.name, v.path, v.size, read_only=read_only)
        for v in config.volumes
    }


def load_record(config: Config, role: Role) -> PairRecord:
    """The persisted pair state. A damaged file is renamed aside and the site starts SMPL:
    what it held (generation, positions, SSWS) cannot be trusted, so the pair must be
    created again (a full copy). Refusing to start would loop under a supervisor, hosts
    down."""
    try:
        record = PairRecord.load(config.data_dir, role)
    except PairRecordError as exc:
        path = config.data_dir / PAIR_FILE_NAME
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            path.rename(aside)
        except OSError as move_exc:
            raise StartupError(f"{exc}; cannot move it aside: {move_exc}") from None
        log.error(
            "%s; moved to %s: this site starts SMPL (not paired); create the pair again",
            exc,
            aside.name,
        )
        record = PairRecord(role=role, reason=f"pair state lost: {exc} (moved to {aside.name})")
        RecordSaver(config.data_dir).save_now(record)
    if record.role is not role:
        raise StartupError(
            f"{config.data_dir}: this site is the {record.role.value} of group {config.group} "
            f"(persisted), not the {role.value}"
        )
    return record


def open_journal(directory: Path, capacity_bytes: int) -> JournalStore:
    try:
        store, report = JournalStore.open(directory, capacity_bytes)
    except JournalCorrupt as exc:
        raise StartupError(f"journal {directory}: {exc}") from None
    log.info(
        "journal %s: seq %d..%d, %d records in %d segments%s",
        directory,
        report.first_seq,
        report.last_seq,
        report.records,
        report.segments,
        f", cut {report.bytes_cut} bytes of torn tail" if report.bytes_cut else "",
    )
    warn_if_the_disk_is_smaller(directory, store.capacity_bytes, store.used_bytes)
    return store


def warn_if_the_disk_is_smaller(directory: Path, capacity_bytes: int, used_bytes: int) -> None:
    """journal.capacity is only kept if the filesystem has room for it: when it does not,
    the journal fails with ENOSPC (the pair suspends, PSUE) before it is ever full (PFUL,
    PFUS). Told at start, when it is cheap to fix, not at the first burst."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return
    room_bytes = used_bytes + fs.f_bavail * fs.f_frsize
    if capacity_bytes > room_bytes:
        log.warning(
            "journal %s: journal.capacity is %s but its filesystem has room for %s: the disk "
            "fills (ENOSPC: the pair suspends, PSUE) before the journal does; lower "
            "journal.capacity or give the journal more space",
            directory,
            human_size(capacity_bytes),
            human_size(room_bytes),
        )


def open_journal_or_set_aside(directory: Path, capacity_bytes: int) -> tuple[JournalStore, str]:
    """The master journal; when it is damaged beyond a torn tail, it is renamed aside (kept
    for a post-mortem) and a fresh one opened, and the second value says why (else "").
    The caller must then treat every region as changed (the lost records cannot be listed)
    and call journal_loss_handled() once that is persisted: until then the why is kept in
    a file beside the journal, so that a kill in between does not forget it. A daemon that
    refused to start instead would loop under its supervisor, its hosts down."""
    marker = directory.with_name(directory.name + ".lost")
    try:
        store = open_journal(directory, capacity_bytes)
    except StartupError as exc:
        aside = directory.with_name(f"{directory.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        why = f"{exc} (moved to {aside.name})"
        try:
            write_bytes_atomic(marker, why.encode())
            directory.rename(aside)
        except OSError as move_exc:
            raise StartupError(f"{exc}; cannot move it aside: {move_exc}") from None
        log.error("%s; moved to %s, starting with an empty journal", exc, aside)
        store = open_journal(directory, capacity_bytes)
    try:
        return store, marker.read_text(errors="replace").strip()
    except FileNotFoundError:
        return store, ""


def journal_loss_handled(directory: Path) -> None:
    directory.with_name(directory.name + ".lost").unlink(missing_ok=True)


def event_log(config: Config, role: Role) -> EventLog:
    return EventLog(config.data_dir / "events.jsonl", config.group, lambda: role.value)


def hook_runner(config: Config, events: EventLog, role: Role) -> HookRunner | None:
    """The pair.hook runner, fed every event of ``events``; None when no hook is configured.

    Made before the group so that transitions emitted while it recovers (before the TaskGroup
    runs the worker) are queued, not lost."""
    if not config.pair.hook:
        return None
    runner = HookRunner(
        config.pair.hook, config.pair.hook_timeout_s, group=config.group, role=role.value
    )
    events.add_listener(runner.submit)
    return runner


OPERATIONS = ("create", "split", "resync", "delete", "takeover")


def control_server(
    config: Config,
    events: EventLog,
    display: Callable[[], Mapping[str, Any]],
    operations: Mapping[str, Handler],
) -> ControlServer:
    """The control API of either role: display and events, the role's operations, and a
    clear refusal for every other pairctl operation."""

    async def show(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return display()

    async def history(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"events": events.history()}

    handlers: dict[str, Handler] = {verb: _not_here(verb) for verb in OPERATIONS}
    handlers |= {"display": show, "events": history, **operations}
    return ControlServer(config.control, handlers, {"events": lambda args: events.follow()})


def on_the_primary(verb: str) -> Handler:
    """A verb the secondary leaves to the primary, which tells the secondary."""

    async def refuse(args: Mapping[str, Any]) -> Mapping[str, Any]:
        raise ControlRefused(
            f"cannot {verb} here: this site is the secondary; run {verb} on the primary "
            "(the secondary follows)"
        )

    return refuse


def on_the_secondary(verb: str) -> Handler:
    """A verb that only the secondary runs (takeover)."""

    async def refuse(args: Mapping[str, Any]) -> Mapping[str, Any]:
        raise ControlRefused(
            f"cannot {verb} here: this site is the primary; {verb} runs on the secondary"
        )

    return refuse


def _not_here(verb: str) -> Handler:
    async def refuse(args: Mapping[str, Any]) -> Mapping[str, Any]:
        raise ControlRefused(f"cannot {verb}: not available on this site")

    return refuse


def announce_ready(config: Config, role: Role, serving: str) -> None:
    """Every port listens and the control socket answers: tell systemd (Type=notify).

    After a swap the new role's process (same pid, exec'ed) says READY=1 again, with the
    new STATUS: systemd keeps the unit active throughout."""
    notify("READY=1", f"STATUS={role.value} of group {config.group}: {serving}")


async def until_either(stop: asyncio.Event, switching: asyncio.Event) -> None:
    """Until a signal asks the daemon to stop, or a swap asks it to switch roles."""
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(switching.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def close_volumes(volumes: Mapping[str, Volume]) -> None:
    for volume in volumes.values():
        volume.sync()
        volume.close()


async def start_metrics(config: Config, source: MetricsSource) -> MetricsServer | None:
    """Serve /metrics on metrics.listen (None when the key is absent). A registry of its own
    per service start: after a role swap the new service registers afresh, never twice."""
    listen = config.metrics.listen
    if listen is None:
        return None
    registry = CollectorRegistry()
    registry.register(GroupCollector(source))
    ProcessCollector(registry=registry)  # CPU seconds, resident memory, open fds
    server = MetricsServer(registry)
    try:
        host, port = await server.start(listen.host, listen.port)
    except OSError as exc:
        raise StartupError(f"metrics.listen {listen}: {exc.strerror or exc}") from None
    log.info("metrics: serving /metrics on %s:%d", host, port)
    return server


def iscsi_server(
    config: Config,
    volumes: Mapping[str, Volume],
    nbd: NbdServer,
    journal: WriteJournal | None,
    *,
    read_only: bool,
) -> IscsiServer | None:
    """The iSCSI target of the group (None when iscsi.listen is absent): LUN n is
    volumes[n], host I/O counted in the NBD exports' statistics (one series per volume),
    logins held to iscsi.chap when it is set."""
    if config.iscsi.listen is None:
        return None
    try:
        chap = load_chap(config.iscsi)
    except ConfigError as exc:  # checked at start: the file changed since
        raise StartupError(str(exc)) from None
    return IscsiServer(
        config.iscsi_iqn,
        list(volumes.values()),
        journal,
        read_only=read_only,
        always_read_only=[v.name for v in config.volumes if v.read_only],
        max_connections=config.iscsi.max_connections,
        stats={n: e.stats for n, e in nbd.exports.items() if e.stats is not None},
        chap=chap,
    )


async def start_iscsi(config: Config, server: IscsiServer, access: str) -> None:
    listen = config.iscsi.listen
    assert listen is not None
    try:
        host, port = await server.start(listen.host, listen.port)
    except OSError as exc:
        raise StartupError(f"iscsi.listen {listen}: {exc.strerror or exc}") from None
    luns = ", ".join(f"LUN {n} {v.name}" for n, v in enumerate(config.volumes))
    log.info(
        "group %s: serving %s %s over iSCSI as %s on %s:%d",
        config.group,
        luns,
        access,
        config.iscsi_iqn,
        host,
        port,
    )
