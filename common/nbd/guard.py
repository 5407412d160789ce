"""Who the NBD server lets in, how long it waits for them, and how much it says about it.

    accept ─► admit(peer, open) ─ not in allow / over max_connections ─► closed, no byte sent
                 │ admitted
                 ▼
    handshaking ── handshake_timeout_s from accept, progress or not ──► dropped
                 │ NBD_OPT_GO / EXPORT_NAME
                 ▼
    transmission ─ idle (nothing half-received, no reply owed) ─► never dropped
                 └ busy (half a header, half a payload, replies not read):
                     no progress for stall_timeout_s ──► dropped

Sans-I/O like the protocol core: the clock is an argument, so a test drives every deadline
without sleeping. Log lines about hostile clients go through a LogLimiter: a flood of 10,000
connections is a few lines and a count, not 10,000 lines.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from common.config import IpNetwork

LOG_BURST_LINES = 20  # lines per kind of event per interval, the rest are counted
LOG_INTERVAL_S = 10.0


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's IP from a peername host; an IPv4-mapped IPv6 address counts as IPv4."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refusal(
    host: str, open_connections: int, max_connections: int, allow: Sequence[IpNetwork] | None
) -> str | None:
    """Why a new connection from `host` must be closed at once, or None to serve it."""
    if allow is not None:
        address = peer_address(host)
        if address is None or not any(address in network for network in allow):
            return "address not in nbd.allow"
    if open_connections >= max_connections:
        return f"nbd.max_connections ({max_connections}) reached"
    return None


class ClientWatch:
    """The deadlines of one connection (see the module diagram)."""

    def __init__(self, now: float, handshake_timeout_s: float, stall_timeout_s: float) -> None:
        self._opened_at = now
        self._handshake_timeout_s = handshake_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._progress: object = None
        self._busy_since: float | None = None

    def overdue(self, now: float, *, handshaking: bool, busy: bool, progress: object) -> str | None:
        """Why the client must be dropped now, or None.

        ``busy``: something is half-received or a reply is owed. ``progress``: any value that
        changes whenever bytes move either way (compared for equality only).
        """
        if handshaking:
            if now - self._opened_at >= self._handshake_timeout_s:
                return f"no handshake within {self._handshake_timeout_s:g} s"
            return None
        if not busy:
            self._busy_since = None
            return None
        if self._busy_since is None or progress != self._progress:
            self._busy_since, self._progress = now, progress
            return None
        if now - self._busy_since >= self._stall_timeout_s:
            return f"stalled mid-request for {self._stall_timeout_s:g} s"
        return None


class LogLimiter:
    """At most LOG_BURST_LINES lines per LOG_INTERVAL_S for one kind of event; the events
    beyond are counted, and summary() hands the count out once the interval is over."""

    def __init__(self, burst: int = LOG_BURST_LINES, interval_s: float = LOG_INTERVAL_S) -> None:
        self._burst = burst
        self.interval_s = interval_s
        self._window_end = float("-inf")
        self._logged = 0
        self._suppressed = 0

    def allow(self, now: float) -> bool:
        """True: log this event in full; False: it was counted instead."""
        if now >= self._window_end:
            self._window_end = now + self.interval_s
            self._logged = 0
        if self._logged < self._burst:
            self._logged += 1
            return True
        self._suppressed += 1
        return False

    def summary(self, now: float) -> int:
        """Events not logged one by one, once their interval is over (then 0 until more)."""
        if not self._suppressed or now < self._window_end:
            return 0
        count, self._suppressed = self._suppressed, 0
        return count
