"""secondaryd's service: pull, restore, destage; the S-VOLs read-only over NBD; control."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from common.config import Config
from common.control import ControlServer, Handler
from common.nbd.server import NbdServer
from common.pairstate import Role
from common.service import (
    close_volumes,
    event_log,
    load_record,
    not_yet,
    open_journal,
    open_volumes,
)
from secondaryd.group import SecondaryGroup

log = logging.getLogger("journalpair")


async def serve(config: Config, stop: asyncio.Event) -> None:
    volumes = open_volumes(config, read_only=False)
    record = load_record(config, Role.SECONDARY)
    store = open_journal(config.data_dir / "restore", config.journal.capacity)
    events = event_log(config, Role.SECONDARY)
    group = SecondaryGroup(config, volumes, store, record, events)
    group.recover()  # before anything is served: the S-VOLs are an exact prefix again
    nbd = NbdServer(volumes, read_only=True)
    group.on_writable.append(nbd.set_writable)
    if group.writable:
        nbd.set_writable(group.marker)

    async def display(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return group.display()

    async def history(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"events": events.history()}

    handlers: dict[str, Handler] = {
        "display": display,
        "events": history,
        "takeover": group.takeover,
    }
    handlers |= {verb: not_yet(verb) for verb in ("create", "split", "resync", "delete")}
    control = ControlServer(config.control, handlers, {"events": lambda args: events.follow()})
    async with asyncio.TaskGroup() as tasks:
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
        await stop.wait()
        log.info("stopping")
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await nbd.stop()
        await control.stop()
        await group.stop()
    store.close()
    close_volumes(volumes)
