"""secondaryd's service: pull, restore, destage; the S-VOLs read-only over NBD (and iSCSI);
control."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from common.config import Config
from common.daemon import StartupError
from common.events import EventLog
from common.journal.store import JournalStore
from common.linksecurity import load_link_security
from common.metrics.collector import MetricsSource
from common.nbd.server import NbdServer
from common.nbd.tls import load_nbd_tls, nbd_tls_mode
from common.pairrecord import PairRecord, RecordSaver
from common.pairstate import PairState, Role
from common.replication.server import ReplicationServer
from common.service import (
    announce_ready,
    close_volumes,
    control_server,
    event_log,
    hook_runner,
    iscsi_server,
    journal_loss_handled,
    load_record,
    on_the_primary,
    open_journal_or_set_aside,
    open_volumes,
    start_iscsi,
    start_metrics,
    until_either,
)
from secondaryd.group import SecondaryGroup
from secondaryd.swapped import SwappedOutAnswerer

log = logging.getLogger("journalpair")


def _leave_the_pair(
    config: Config, record: PairRecord, store: JournalStore, events: EventLog, why: str
) -> None:
    """The restore journal was damaged and set aside: records restored but not applied are
    gone, and the S-VOLs may hold a half-applied window only it could finish. So this site
    is no longer a copy: SMPL, generation forgotten. Its Hello then makes a paired primary
    suspend (PSUE) with every region marked, and a resync copies everything. An SSWS site
    keeps serving its hosts (its restore journal held nothing it needs)."""
    if record.state in (PairState.SMPL, PairState.SSWS):
        return
    old = record.state
    record.state = PairState.SMPL
    record.reason = f"restore journal lost: {why}: resync on the primary copies everything"
    record.generation = ""
    record.start_seq = store.next_seq
    record.applied_seq = record.destage_intent_seq = store.last_seq
    record.svol_consistent = False
    RecordSaver(config.data_dir).save_now(record)
    log.error("%s", record.reason)
    events.emit(old.value, record.state.value, record.reason)


async def _answer_as_the_old_primary(
    config: Config, record: PairRecord, settled: asyncio.Event
) -> None:
    """A swap made this site the secondary: until it joins the new primary's generation, it
    tells the other site so if that site asks (secondaryd.swapped)."""
    listen = config.replication_listen
    if listen is None:
        log.warning(
            "a swap made this site the secondary, and its config has no listen.replication: "
            "if the answer to that swap was lost, the other site cannot learn it"
        )
        return
    server = ReplicationServer(
        SwappedOutAnswerer(config.group, record), load_link_security(config.link)
    )
    try:
        host, port = await server.start(listen.host, listen.port)
    except OSError as exc:
        log.error(
            "cannot listen on %s:%d to tell the other site that the swap took place: %s",
            listen.host,
            listen.port,
            exc.strerror or exc,
        )
        return
    log.info(
        "listening on %s:%d until the new primary's generation is joined: if the answer to "
        "the swap was lost, the other site learns here that it took place",
        host,
        port,
    )
    try:
        await settled.wait()
    finally:
        await server.stop()


async def serve(config: Config, stop: asyncio.Event) -> Role | None:
    if config.primary is None:
        raise StartupError(
            "this site is the secondary (a swap made it so) but its config has no primary: "
            "address (the other site's listen.replication) to pull from"
        )
    volumes = open_volumes(config, read_only=False)
    record = load_record(config, Role.SECONDARY)
    restore_dir = config.data_dir / "restore"
    store, journal_lost = open_journal_or_set_aside(restore_dir, config.journal.capacity)
    events = event_log(config, Role.SECONDARY)
    if journal_lost:
        _leave_the_pair(config, record, store, events, journal_lost)
        journal_loss_handled(restore_dir)
    hooks = hook_runner(config, events, Role.SECONDARY)
    group = SecondaryGroup(config, volumes, store, record, events)
    group.recover()  # before anything is served: the S-VOLs are an exact prefix again
    nbd = NbdServer(
        volumes,
        read_only=True,
        always_read_only=[v.name for v in config.volumes if v.read_only],
        limits=config.nbd,
        tls_context=load_nbd_tls(config.nbd),
        tls_mode=nbd_tls_mode(config.nbd),
        count_requests=config.metrics.listen is not None,
    )
    iscsi = iscsi_server(config, volumes, nbd, None, read_only=True)
    for server in (nbd, iscsi) if iscsi is not None else (nbd,):
        group.on_writable.append(server.set_writable)
        group.on_read_only.append(server.set_read_only)
        if group.writable:
            server.set_writable(group.marker)

    control = control_server(
        config,
        events,
        group.display,
        {
            "takeover": group.takeover,
            "resync": group.resync,
            **{verb: on_the_primary(verb) for verb in ("create", "split", "delete")},
        },
    )
    metrics_source = MetricsSource(
        display=group.display,
        dirty_bytes=lambda: {name: b.dirty_bytes for name, b in group.bitmaps.items()},
        host_io={n: e.stats for n, e in nbd.exports.items() if e.stats is not None},
        link=group.link_stats,
        journal_sync=store.sync_latency,
    )
    async with asyncio.TaskGroup() as tasks:
        if hooks is not None:
            hooks.start(tasks)
        running = await group.run(tasks)
        if not group.swap_settled.is_set():
            running.append(
                tasks.create_task(_answer_as_the_old_primary(config, record, group.swap_settled))
            )
        host, port = await nbd.start(config.nbd_listen.host, config.nbd_listen.port)
        log.info(
            "group %s: serving %s %s over NBD on %s:%d",
            config.group,
            ", ".join(volumes),
            "read-write (SSWS)" if group.writable else "read-only",
            host,
            port,
        )
        if iscsi is not None:
            await start_iscsi(config, iscsi, "read-write (SSWS)" if group.writable else "read-only")
        await control.start()
        metrics = await start_metrics(config, metrics_source)
        announce_ready(config, Role.SECONDARY, f"NBD on {host}:{port}")
        await until_either(stop, group.switching)
        log.info("stopping")
        if metrics is not None:
            await metrics.stop()
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if iscsi is not None:
            await iscsi.stop()
        await nbd.stop()
        await control.stop()
        await group.stop()
        if hooks is not None:
            await hooks.stop()  # after the group's last transition
    store.close()
    close_volumes(volumes)
    return group.switch_to
