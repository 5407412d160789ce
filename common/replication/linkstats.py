"""Counters of one site's end of the replication link, for the metrics collector.

Bytes are the link protocol's (messages and the authentication exchange), counted where
each end hands them to, or takes them from, its transport: TLS adds its own overhead on the
wire, not counted here. A link "comes up" when the primary welcomes the secondary (Hello
answered with Welcome); every time after the first (since the daemon started) is a reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinkStats"]


@dataclass(slots=True)
class LinkStats:
    sent_bytes: int = 0
    received_bytes: int = 0
    ups: int = 0  # times the link came up

    @property
    def reconnects(self) -> int:
        return max(0, self.ups - 1)

    def came_up(self) -> None:
        self.ups += 1
