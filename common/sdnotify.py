"""Tell systemd (a Type=notify unit) that the daemon is ready, or stopping: sd_notify(3).

    NOTIFY_SOCKET unset ── nothing (not started by systemd, or not Type=notify)
    NOTIFY_SOCKET=/run/systemd/notify  or  @abstract-name
        └─ one datagram: "READY=1\\nSTATUS=..." (or "STOPPING=1") ── sendto, never blocks

The protocol is one unix datagram of newline-separated KEY=VALUE lines; no library needed.
A failure to send is logged once per message and never stops the daemon: systemd then
times the start out by itself, which says more than a daemon that refused to serve.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["NOTIFY_SOCKET_ENV", "notify"]

log = logging.getLogger("journalpair")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
_MESSAGE_BYTES_MAX = 4096  # a STATUS line is one short sentence; systemd takes far more


def notify(*fields: str) -> bool:
    """Send ``fields`` ("READY=1", "STATUS=...") to $NOTIFY_SOCKET; False when not sent."""
    address = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: a leading NUL byte, no file
        address = "\0" + address[1:]
    message = "\n".join(fields).encode()[:_MESSAGE_BYTES_MAX]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True
