"""secondaryd's service: pull, restore, destage; the S-VOLs read-only over NBD; control."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from common.config import Config
from common.daemon import StartupError
from common.nbd.server import NbdServer
from common.pairstate import Role
from common.service import (
    close_volumes,
    control_server,
    event_log,
    hook_runner,
    load_record,
    on_the_primary,
    open_journal,
    open_volumes,
    until_either,
)
from secondaryd.group import SecondaryGroup

log = logging.getLogger("journalpair")


async def serve(config: Config, stop: asyncio.Event) -> Role | None:
    if config.primary is None:
        raise StartupError(
            "this site is the secondary (a swap made it so) but its config has no primary: "
            "address (the other site's listen.replication) to pull from"
        )
    volumes = open_volumes(config, read_only=False)
    record = load_record(config, Role.SECONDARY)
    store = open_journal(config.data_dir / "restore", config.journal.capacity)
    events = event_log(config, Role.SECONDARY)
    hooks = hook_runner(config, events, Role.SECONDARY)
    group = SecondaryGroup(config, volumes, store, record, events)
    group.recover()  # before anything is served: the S-VOLs are an exact prefix again
    nbd = NbdServer(volumes, read_only=True)
    group.on_writable.append(nbd.set_writable)
    group.on_read_only.append(nbd.set_read_only)
    if group.writable:
        nbd.set_writable(group.marker)

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
    async with asyncio.TaskGroup() as tasks:
        if hooks is not None:
            hooks.start(tasks)
        running = await group.run(tasks)
        host, port = await nbd.start(config.nbd_listen.host, config.nbd_listen.port)
        log.info(
            "group %s: serving %s %s over NBD on %s:%d",
            config.group,
            ", ".join(volumes),
            "read-write (SSWS)" if group.writable else "read-only",
            host,
            port,
        )
        await control.start()
        await until_either(stop, group.switching)
        log.info("stopping")
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await nbd.stop()
        await control.stop()
        await group.stop()
        if hooks is not None:
            await hooks.stop()  # after the group's last transition
    store.close()
    close_volumes(volumes)
    return group.switch_to
