"""The control socket of a real daemon: owner only, the one way in, and start-up refusals.

primaryd / secondaryd started under umask 0 (the least helpful one)
    ├─ control socket: a socket, mode 0600, owned by the daemon's user; pairctl works
    ├─ /proc/<pid>/fd ∩ /proc/net/{tcp,tcp6}: listening only on the configured ports
    │  (no TCP control listener), /proc/net/unix: listening only on the control socket
    └─ a second daemon on the same socket, a listen address that is taken or not on this
       host, a control path that is not a socket, a data_dir that cannot be made:
       exit 1, a last line that says so, no traceback, and the first daemon still answers
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    HOST,
    Daemon,
    Daemons,
    display,
    qemu_io,
    run_daemon_to_exit,
    wait_until,
)

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
    # start() returns once NBD accepts; the control socket is bound a moment later.
    wait_until(path.exists, timeout_s=10, what=f"{path} to be bound")
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


def assert_cannot_start(role: str, config: Path, *names: str) -> str:
    """Exit 1 with a last line "<role>d: cannot start: ..." naming ``names``, no traceback."""
    result = run_daemon_to_exit(role, config)
    shown = f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, shown
    assert result.returncode == 1, shown
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"{role}d: cannot start: "), shown
    for name in names:
        assert name in last, f"{name!r} not named\n{shown}"
    return last


def edit_config(daemon: Daemon, key_line: str, new_line: str) -> Path:
    """Replace the config line that starts with ``key_line`` (e.g. "  nbd:") by ``new_line``."""
    text, count = re.subn(
        rf"^{re.escape(key_line)} .*$", new_line, daemon.config_path.read_text(), flags=re.M
    )
    assert count == 1, (key_line, text)
    daemon.config_path.write_text(text)
    return daemon.config_path


def test_a_second_daemon_on_the_same_control_socket_is_refused(daemons: Daemons) -> None:
    primary = daemons.start_primary()
    path = control_path(primary)
    other = daemons.prepare("primary", name="primary-second")  # own ports, data_dir, volume
    config = edit_config(other, "control:", f"control: {path}")
    assert_cannot_start("primary", config, f"another daemon is already listening on {path}")
    assert display(primary)["state"] == "SMPL"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("taken", ["nbd", "replication"])
def test_a_listen_address_in_use_is_refused(daemons: Daemons, taken: str) -> None:
    primary = daemons.start_primary()
    port = primary.nbd_port if taken == "nbd" else primary.peer_port
    other = daemons.prepare("primary", name="primary-second")
    config = edit_config(other, f"  {taken}:", f"  {taken}: {HOST}:{port}")
    assert_cannot_start("primary", config, str(port), "address already in use")
    assert display(primary)["state"] == "SMPL"


def test_a_listen_address_not_on_this_host_is_refused(daemons: Daemons) -> None:
    site = daemons.prepare("secondary")
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this host.
    config = edit_config(site, "  nbd:", "  nbd: 192.0.2.1:10809")
    assert_cannot_start("secondary", config, "192.0.2.1", "cannot assign requested address")


def test_a_control_path_that_is_a_file_is_refused_and_left_alone(daemons: Daemons) -> None:
    site = daemons.prepare("primary")
    path = control_path(site)
    path.write_text("precious")
    assert_cannot_start("primary", site.config_path, str(path), "is not a socket")
    assert path.read_text() == "precious"


def test_a_control_path_that_is_a_directory_is_refused(daemons: Daemons) -> None:
    site = daemons.prepare("secondary")
    path = control_path(site)
    path.mkdir()
    assert_cannot_start("secondary", site.config_path, str(path), "is not a socket")
    assert path.is_dir()


def test_a_data_dir_that_cannot_be_made_is_refused(daemons: Daemons) -> None:
    site = daemons.prepare("primary")
    in_the_way = site.config_path.parent / "a-file"
    in_the_way.write_text("")
    config = edit_config(site, "data_dir:", f"data_dir: {in_the_way / 'data'}")
    assert_cannot_start("primary", config, f"data_dir {in_the_way / 'data'}", "Not a directory")


def test_a_second_daemon_on_the_same_data_dir_is_refused(daemons: Daemons) -> None:
    """Other ports and control socket, same data_dir: it must not open the live journal."""
    first = daemons.start_primary()
    second = daemons.prepare("primary", name="second")
    text = second.config_path.read_text()
    first_data = f"data_dir: {first.config_path.parent / 'data'}\n"
    second.config_path.write_text(
        re.sub(r"(?m)^data_dir: .*\n", lambda _m: first_data, text, count=1)
    )
    done = run_daemon_to_exit("primary", second.config_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is using data_dir" in lines[0], done.stderr
    assert f"pid {first.pid}" in lines[0]
    assert first.running()
    qemu_io(first.uri(), "write -P 0x11 0 64k")  # the first one is unharmed
