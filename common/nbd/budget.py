"""How many bytes all the NBD connections of one server may hold together (nbd.memory_limit).

    nbd.memory_limit
    ├─ half: one share per connection slot, limit / 2 / nbd.max_connections, always its own
    └─ half: the pool, first come first served, for what a connection holds beyond its share

    connection ─ hold(who, bytes held now) ─► budget ─► the waiters to wake, if the pool freed
               ─ room(who) ─► its share left + the pool left; nothing left: it stops reading
               ─ wait(who) ─► woken (hold() returns it) the next time the pool frees bytes

What a connection holds: reply bytes made and not yet taken by the client (queued, or in the
transport's buffer) and its receive buffer beyond the standard one (a big WRITE's payload). A
client that keeps to its share is never held back by others; one that wants more (a 32 MiB
WRITE) waits while the pool is taken, until the holders' clients read their replies or are
dropped (nbd.stall_timeout_s). Nothing is ever dropped or refused for memory: reading stops.

Sans-I/O like common.nbd.guard: no loop, no transport; common.nbd.server acts on the answers.
"""

from __future__ import annotations

from collections.abc import Hashable


class MemoryBudget:
    def __init__(self, limit_bytes: int, holders_max: int) -> None:
        if limit_bytes < 2 * holders_max or holders_max < 1:
            raise ValueError(f"a budget of {limit_bytes} bytes for {holders_max} holders")
        self.limit_bytes = limit_bytes
        self.share_bytes = limit_bytes // (2 * holders_max)
        self.pool_bytes = limit_bytes - self.share_bytes * holders_max
        self._held: dict[Hashable, int] = {}
        self._held_bytes = 0
        self._pool_used_bytes = 0
        self._waiting: dict[Hashable, None] = {}  # an ordered set: woken first come first

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    @property
    def pool_free_bytes(self) -> int:
        return max(0, self.pool_bytes - self._pool_used_bytes)

    def hold(self, holder: Hashable, nbytes: int) -> list[Hashable]:
        """``holder`` now holds ``nbytes`` (not more: this replaces what it said before).
        Returns the waiters to wake (each asks room() again) when that freed pool bytes."""
        old = self._held.get(holder, 0)
        if nbytes == old:
            return []
        self._held[holder] = nbytes
        self._held_bytes += nbytes - old
        pool_change = self._beyond_share(nbytes) - self._beyond_share(old)
        self._pool_used_bytes += pool_change
        return self._wake() if pool_change < 0 else []

    def room(self, holder: Hashable) -> int:
        """Bytes ``holder`` may take on top of what it holds: its share left, and the pool."""
        return max(0, self.share_bytes - self._held.get(holder, 0)) + self.pool_free_bytes

    def wait(self, holder: Hashable) -> None:
        """``holder`` stopped for want of room: hold() hands it back once the pool frees."""
        self._waiting[holder] = None

    def forget(self, holder: Hashable) -> list[Hashable]:
        """``holder`` is gone and holds nothing; returns the waiters to wake, like hold()."""
        self._waiting.pop(holder, None)
        woken = self.hold(holder, 0)
        self._held.pop(holder, None)
        return woken

    def _beyond_share(self, nbytes: int) -> int:
        return max(0, nbytes - self.share_bytes)

    def _wake(self) -> list[Hashable]:
        woken = list(self._waiting)
        self._waiting.clear()
        return woken
