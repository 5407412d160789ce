"""What both daemons do to start and stop: config, volumes, NBD, signals, role switches.

A site hosts one role at a time and persists which (pair.json); the config's `role` is only
the role a fresh site starts in. Each program runs its own role: `primaryd` on a site that a
swap made the secondary starts `secondaryd` in its place (exec: same pid, same arguments),
and a service that swaps roles while running returns the new role, so the daemon stops
cleanly and execs the other program. The role packages never import each other.

Signals: SIGTERM and SIGINT stop gracefully; SIGUSR1 switches the log level to DEBUG and,
sent again, back to log.level (common.logsetup).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import uvloop

from common import logsetup, pairrecord
from common.config import Config, ConfigError, check_volume_files, load_config
from common.control import ControlError
from common.iscsi import credentials as iscsi_credentials
from common.linksecurity import load_link_security
from common.nbd import tls as nbd_tls
from common.pairrecord import PairRecord, PairRecordError
from common.pairstate import Role
from common.sdnotify import notify
from common.volume import VolumeError

log = logging.getLogger("journalpair")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD_BYTES = 64 << 20


def keep_big_buffers_in_the_heap() -> None:
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


LOCK_FILE = "lock"  # in data_dir: flock'ed by the daemon using it, holds its pid

# A listen address in use or not on this host: a startup failure, not a bug.
_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the problem and where help is), not usage text and then it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# Returns the role to switch to (a swap happened), or None once stopped by a signal.
RoleService = Callable[[Config, asyncio.Event], Awaitable[Role | None]]
PROGRAMS = {Role.PRIMARY: "primaryd", Role.SECONDARY: "secondaryd"}  # module = program name


def run(prog: str, role: str, serve_role: RoleService, argv: list[str] | None = None) -> int:
    parser = _Parser(prog=prog, description=f"journalpair {role} daemon")
    parser.add_argument("--config", required=True, help="YAML config file")
    args = parser.parse_args(argv)
    logsetup.configure(prog)  # until the config says otherwise
    try:
        config = load_config(args.config)
        logsetup.configure(prog, config.log.format, config.log.level)
        # From here on: SIGUSR1's default action would kill the daemon.
        signal.signal(signal.SIGUSR1, lambda _sig, _frame: logsetup.toggle_debug())
        site_role = _site_role(config)
        if site_role is None and config.role != role:
            raise ConfigError(f"role: config says {config.role}, this is {prog}")
        check_volume_files(config)
        security = load_link_security(config.link)
        nbd_tls.load_nbd_tls(config.nbd)  # checked here; each role's service loads it again
        iscsi_credentials.load_chap(config.iscsi)  # the same
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return 2
    if site_role is not None and site_role.value != role:
        log.info("this site is the %s (persisted in pair.json)", site_role.value)
        _become(site_role, args.config)
    try:
        lock_fd = _lock_data_dir(config.data_dir)
    except StartupError as exc:
        print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        return 1
    log.info("replication link: %s", security.describe())
    log.info("NBD: %s", nbd_tls.describe(config.nbd))
    if config.iscsi.listen is not None:
        exposed = config.iscsi.exposed_without_chap
        level = logging.WARNING if exposed else logging.INFO
        log.log(level, "iSCSI: %s", iscsi_credentials.describe(config.iscsi))
    keep_big_buffers_in_the_heap()
    try:
        switch_to = uvloop.run(_serve(config, serve_role))
    except VolumeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        return 1
    if switch_to is not None:
        _become(switch_to, args.config)  # the lock goes with exec (O_CLOEXEC), taken again
    os.close(lock_fd)
    return 0


def _lock_data_dir(data_dir: Path) -> int:
    """Hold data_dir/lock (flock) for the life of the process: a second daemon started on
    the same data_dir would open the live journal and state files and corrupt them."""
    path = data_dir / LOCK_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"data_dir {data_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(f"another daemon (pid {holder}) is using data_dir {data_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _site_role(config: Config) -> Role | None:
    """The role persisted in pair.json, None for a fresh site (or an unreadable file: the
    service reports that)."""
    if not (config.data_dir / pairrecord.FILE_NAME).exists():
        return None
    try:
        return PairRecord.load(config.data_dir, Role(config.role)).role
    except PairRecordError:
        return None


def _become(role: Role, config_path: str) -> None:
    """Replace this process with the daemon of `role` (same pid: supervisors keep it)."""
    program = PROGRAMS[role]
    log.info("starting %s in this process", program)
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", program, "--config", config_path])


async def _serve(config: Config, serve_role: RoleService) -> Role | None:
    """Run the role's service until SIGTERM/SIGINT, or until it switched roles."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopping, stop)
    loop.add_signal_handler(signal.SIGUSR1, logsetup.toggle_debug)  # on the loop thread
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"data_dir {config.data_dir}: {exc.strerror or exc}") from None
    try:
        switch_to = await serve_role(config, stop)
    except BaseExceptionGroup as group:  # the service's TaskGroup wraps what failed in it
        raise _startup_error(group) from None
    log.info("stopped" if switch_to is None else f"stopped: this site is now the {switch_to}")
    return switch_to


def _stopping(stop: asyncio.Event) -> None:
    """A signal: stop, and tell systemd (Type=notify) that the daemon is on its way out.
    A role swap does not say so: the same process goes on as the other daemon."""
    if not stop.is_set():
        notify("STOPPING=1", "STATUS=stopping (signal)")
    stop.set()


def _startup_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one failure in ``group`` when it explains itself in one line (a StartupError or
    a VolumeError); anything else, or more than one failure, stays the group: a traceback."""
    leaves = _leaves(group)
    if len(leaves) != 1:
        return group
    leaf = leaves[0]
    if isinstance(leaf, StartupError | VolumeError):
        return leaf
    if isinstance(leaf, ControlError):  # the socket is taken, or cannot be made
        return StartupError(str(leaf))
    if isinstance(leaf, OSError) and leaf.errno in _LISTEN_ERRNOS:
        return StartupError(leaf.strerror or str(leaf))  # asyncio's names the address
    return group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves
