"""Daemons with an nbd: section and read-only volumes in their config, and what the NBD hostile
and access tests measure (the daemon's RSS, its log lines)."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from tests.e2e.helpers import Daemon, Daemons, MiB

VOLUMES = (("vol0", 64 * MiB),)


def prepare_with_nbd(
    daemons: Daemons,
    role: str = "primary",
    *,
    nbd: Mapping[str, Any] | None = None,
    read_only: Collection[str] = (),
    volumes: Sequence[tuple[str, int]] = VOLUMES,
    primary_port: int | None = None,
) -> Daemon:
    """daemons.prepare, then the config gets ``nbd:`` and ``read_only: true`` on the volumes
    named in ``read_only`` (not started)."""
    daemon = daemons.prepare(role, volumes, primary_port=primary_port)
    text = daemon.config_path.read_text()
    for name in read_only:
        line = re.search(rf"^  - \{{name: {re.escape(name)}, .*\}}$", text, re.MULTILINE)
        assert line is not None, f"no volume {name} in {text}"
        text = text.replace(line[0], line[0][:-1] + ", read_only: true}")
    if nbd is not None:
        text += f"nbd: {json.dumps(dict(nbd))}\n"
    daemon.config_path.write_text(text)
    return daemon


def start_with_nbd(daemons: Daemons, **kwargs: Any) -> Daemon:
    daemon = prepare_with_nbd(daemons, **kwargs)
    daemon.start()
    return daemon


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def log_lines(daemon: Daemon, offset: int = 0) -> list[str]:
    return daemon.log_text()[offset:].splitlines()


def recv_exact(sock: socket.socket, length: int) -> bytes:
    """Exactly `length` bytes from a raw (or TLS-wrapped) NBD client socket."""
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {length} bytes")
        data += chunk
    return data
