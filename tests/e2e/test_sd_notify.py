"""systemd's Type=notify: a real daemon sends READY=1 once it serves, STOPPING=1 on SIGTERM.

    test: bind a unix datagram socket ── NOTIFY_SOCKET=it ──► primaryd / secondaryd
          recv "READY=1\\nSTATUS=..." ◄── after NBD and the control socket listen
          SIGTERM ──► recv "STOPPING=1"

The units in deploy/systemd are Type=notify: without READY=1 systemd would time them out.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.sdnotify import NOTIFY_SOCKET_ENV, notify
from tests.e2e.helpers import START_TIMEOUT_S, Daemons, display

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def _fields(sock: socket.socket) -> dict[str, str]:
    """One notification, bounded by the daemon's start timeout, as {KEY: VALUE}."""
    sock.settimeout(START_TIMEOUT_S)
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(tmp_path / "notify.sock"))
        yield sock


def test_primaryd_sends_ready_once_it_serves_and_stopping_on_sigterm(
    daemons: Daemons, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NOTIFY_SOCKET_ENV, listener.getsockname())
    primary = daemons.prepare("primary")
    primary.start()

    ready = _fields(listener)
    assert ready.get("READY") == "1", ready
    assert ready["STATUS"] == f"primary of group jg0: NBD on 127.0.0.1:{primary.nbd_port}"
    assert display(primary)["role"] == "primary"  # ready means pairctl works at once

    primary.stop()
    assert _fields(listener).get("STOPPING") == "1"


def test_secondaryd_notifies_an_abstract_socket(
    daemons: Daemons, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"journalpair-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # systemd writes an abstract address as @name
        monkeypatch.setenv(NOTIFY_SOCKET_ENV, "@" + name)
        secondary = daemons.prepare("secondary")
        secondary.start()
        ready = _fields(sock)
        assert ready.get("READY") == "1", ready
        assert ready["STATUS"].startswith("secondary of group jg0: NBD on 127.0.0.1:")


def test_notify_without_systemd_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NOTIFY_SOCKET_ENV, raising=False)
    assert notify("READY=1") is False


def test_notify_to_a_socket_nobody_listens_on_is_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NOTIFY_SOCKET_ENV, os.fspath(tmp_path / "gone.sock"))
    assert notify("READY=1") is False
