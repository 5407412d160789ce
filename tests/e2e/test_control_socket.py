"""The control socket of a real daemon: owner only, and the one way in.

primaryd / secondaryd started under umask 0 (the least helpful one)
    ├─ control socket: a socket, mode 0600, owned by the daemon's user; pairctl works
    └─ /proc/<pid>/fd ∩ /proc/net/{tcp,tcp6}: listening only on the configured ports
       (no TCP control listener), /proc/net/unix: listening only on the control socket
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, Daemons, display

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

_TCP_LISTEN = "0A"  # st in /proc/net/tcp
_SO_ACCEPTCON = 0x10000  # Flags in /proc/net/unix: a listening socket


@pytest.fixture
def umask_0() -> Iterator[None]:
    """Daemons started in the test inherit umask 0: the socket's mode must not depend on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(int(match[1]))
    return inodes


def tcp_listen_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on, IPv4 and IPv6."""
    mine = socket_inodes(pid)
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == _TCP_LISTEN and inode in mine:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def unix_listen_paths(pid: int) -> set[str]:
    mine = socket_inodes(pid)
    paths = set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        flags, inode = int(fields[3], 16), int(fields[6])
        if flags & _SO_ACCEPTCON and inode in mine:
            paths.add(fields[7] if len(fields) > 7 else "(unnamed)")
    return paths


def control_path(daemon: Daemon) -> Path:
    return daemon.config_path.parent / f"{daemon.role}.sock"


def assert_private_and_the_only_way_in(daemon: Daemon, ports: set[int]) -> None:
    path = control_path(daemon)
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    assert stat.S_IMODE(st.st_mode) == 0o600, f"{path} has mode {stat.S_IMODE(st.st_mode):04o}"
    assert st.st_uid == os.geteuid()
    assert display(daemon)["role"] == daemon.role  # the owner is refused nothing
    assert tcp_listen_ports(daemon.pid) == ports, "a TCP listener beyond the configured ports"
    assert unix_listen_paths(daemon.pid) == {os.fspath(path)}


def test_a_primary_is_reached_only_through_its_owner_only_socket(
    daemons: Daemons, umask_0: None
) -> None:
    primary = daemons.start_primary()
    assert_private_and_the_only_way_in(primary, {primary.nbd_port, primary.peer_port})


def test_a_secondary_is_reached_only_through_its_owner_only_socket(
    daemons: Daemons, umask_0: None
) -> None:
    secondary = daemons.start_secondary()  # no listen.replication in its config
    assert_private_and_the_only_way_in(secondary, {secondary.nbd_port})
