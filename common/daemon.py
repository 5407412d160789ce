"""What both daemons do to start and stop: config, volumes, NBD, signals."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

from common.config import Config, ConfigError, check_volume_files, load_config
from common.volume import VolumeError

log = logging.getLogger("journalpair")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD_BYTES = 64 << 20


def _keep_big_buffers_in_the_heap() -> None:
    """Serve 1 MiB reads and writes from reused heap memory, not a fresh mmap each.

    glibc mmaps every allocation over its (dynamic) threshold and unmaps it on
    free, so each 1 MiB read buffer cost ~256 page faults: most of a large read's
    CPU time. Freed memory above the trim threshold still goes back to the OS.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: its defaults are fine
        log.debug("mallopt unavailable; keeping the allocator's defaults")


class StartupError(Exception):
    """The daemon cannot start (corrupt journal, unreadable state...): one line, exit 1."""


RoleService = Callable[[Config, asyncio.Event], Awaitable[None]]


def run(prog: str, role: str, serve_role: RoleService, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=f"journalpair {role} daemon")
    parser.add_argument("--config", required=True, help="YAML config file")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {prog} %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
        if config.role != role:
            raise ConfigError(f"role: config says {config.role}, this is {prog}")
        check_volume_files(config)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return 2
    _keep_big_buffers_in_the_heap()
    try:
        return uvloop.run(_serve(config, serve_role))
    except VolumeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        return 1


async def _serve(config: Config, serve_role: RoleService) -> int:
    """Run the role's service until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    await serve_role(config, stop)
    log.info("stopped")
    return 0
