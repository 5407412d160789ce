"""primaryd's service: NBD (and iSCSI) with the master journal, read-journal server, control
socket."""

from __future__ import annotations

import asyncio
import logging

from common.config import Config
from common.daemon import StartupError
from common.metrics.collector import MetricsSource
from common.nbd.server import NbdServer
from common.nbd.tls import load_nbd_tls, nbd_tls_mode
from common.pairstate import Role
from common.runmarker import LastStop, mark_running, mark_stopped
from common.service import (
    announce_ready,
    close_volumes,
    control_server,
    event_log,
    hook_runner,
    iscsi_server,
    load_record,
    on_the_secondary,
    open_journal_or_set_aside,
    open_volumes,
    start_iscsi,
    start_metrics,
    until_either,
)
from primaryd.group import PrimaryGroup

log = logging.getLogger("journalpair")


async def serve(config: Config, stop: asyncio.Event) -> Role | None:
    if config.replication_listen is None:
        raise StartupError(
            "this site is the primary (a swap made it so) but its config has no "
            "listen.replication address to serve the secondary on"
        )
    volumes = open_volumes(config, read_only=False)
    record = load_record(config, Role.PRIMARY)
    store, journal_lost = open_journal_or_set_aside(
        config.data_dir / "journal", config.journal.capacity
    )
    events = event_log(config, Role.PRIMARY)
    hooks = hook_runner(config, events, Role.PRIMARY)
    group = PrimaryGroup(config, volumes, store, record, events)
    group.last_stop = mark_running(config.data_dir)
    group.journal_lost = journal_lost
    if group.last_stop is not LastStop.CLEAN:
        log.warning("the last stop was not clean (%s)", group.last_stop.value)
    nbd = NbdServer(
        volumes,
        journal=group.journal,
        always_read_only=[v.name for v in config.volumes if v.read_only],
        limits=config.nbd,
        tls_context=load_nbd_tls(config.nbd),
        tls_mode=nbd_tls_mode(config.nbd),
        count_requests=config.metrics.listen is not None,
    )
    iscsi = iscsi_server(config, volumes, nbd, group.journal, read_only=False)

    def host_access(allowed: bool) -> None:
        for server in (nbd, iscsi) if iscsi is not None else (nbd,):
            if allowed:
                server.set_writable(group.journal)
            else:
                server.set_read_only()

    group.host_access = host_access

    operations = {
        "create": group.create,
        "split": group.split,
        "resync": group.resync,
        "delete": group.delete,
        "takeover": on_the_secondary("takeover"),
    }
    control = control_server(config, events, group.display, operations)
    metrics_source = MetricsSource(
        display=group.display,
        dirty_bytes=lambda: {name: b.dirty_bytes for name, b in group.bitmaps.items()},
        host_io={n: e.stats for n, e in nbd.exports.items() if e.stats is not None},
        link=group.link_server.stats,
        journal_sync=store.sync_latency,
        read_journal_age_s=group.read_journal_age_s,
    )
    async with asyncio.TaskGroup() as tasks:
        if hooks is not None:
            hooks.start(tasks)
        await group.start(tasks)
        host, port = await nbd.start(config.nbd_listen.host, config.nbd_listen.port)
        log.info(
            "group %s: serving %s over NBD on %s:%d", config.group, ", ".join(volumes), host, port
        )
        if iscsi is not None:
            await start_iscsi(config, iscsi, "read-write")
        await control.start()
        metrics = await start_metrics(config, metrics_source)
        announce_ready(config, Role.PRIMARY, f"NBD on {host}:{port}")
        await until_either(stop, group.switching)
        log.info("stopping: answering in-flight requests")
        if metrics is not None:
            await metrics.stop()
        if iscsi is not None:
            await iscsi.stop()
        await nbd.stop()
        await control.stop()
        await group.stop()
        if hooks is not None:
            await hooks.stop()  # after the group's last transition
    group.journal.flush_records()
    store.prepare_sync().run()
    store.close()
    close_volumes(volumes)
    mark_stopped(config.data_dir)
    return group.switch_to
