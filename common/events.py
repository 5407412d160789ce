"""The pair event log: every state change (and a few other events) as one JSON line, a log
line, and a feed.

    emit(old, new, reason, **extra)             a transition: "kind": "transition"
    notice(kind, state, reason, **extra)        an event in a state, e.g. "rpo_exceeded"
        │ {"time", "group", "role", "kind", "old", "new", "reason", **extra}
        ├─► events.log: one appended JSON line (rotated to events.log.1 past max_bytes)
        ├─► log INFO  "PAIR -> PSUS: split by operator" (fields group, role, state, old;
        │             a notice at its own level, "rpo_exceeded in PAIR: ...")
        ├─► every follower's bounded queue (full: the oldest is dropped and counted)
        └─► every listener (add_listener), e.g. the pair.hook runner's submit()

    history(limit)  ◄── last lines of events.log.1 + events.log (corrupt lines skipped)
    follow()        ──► async iterator of new events ("dropped": n after a gap)

The file is not fsynced: the persisted state file is the durable record of a transition
(invariant 6), this log is its explanation. A failed append is a WARNING, never an exception,
so a full disk cannot stop a transition that was already persisted.

A notice is not a transition: its "old" and "new" are both the current state, so a consumer
that only looks at old and new (a hook written before notices existed) sees no change.

A follower that does not keep up (a stalled `pairctl events --follow`) loses the oldest events
rather than holding memory or the emitter: its queue is bounded, and the next event it gets
says how many it missed. A listener is called synchronously on the loop thread and must return
at once; one that raises is logged and skipped, never turned into a failed transition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["EVENT_LOG_BYTES_MAX", "FOLLOW_QUEUE_MAX", "EventLog"]

log = logging.getLogger("journalpair.events")

EVENT_LOG_BYTES_MAX = 4 << 20  # per file; one rotated file is kept besides the current one
FOLLOW_QUEUE_MAX = 1000  # events held for one follower that is not reading
_RESERVED = ("time", "group", "role", "kind", "old", "new", "reason")
TRANSITION = "transition"  # the kind of a state change; notices name their own kind


def _log_fields(extra: dict[str, Any]) -> dict[str, Any]:
    """The event's extra keys that are log fields too (common.logsetup.FIELDS)."""
    return {key: extra[key] for key in ("seq", "volume", "peer") if key in extra}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Follower:
    """One subscriber: a bounded queue and the count of events dropped since its last read."""

    def __init__(self, queue_max: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_max)
        self.dropped = 0

    def offer(self, event: dict[str, Any]) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def next(self) -> dict[str, Any]:
        event = await self.queue.get()
        if self.dropped:
            event = {**event, "dropped": self.dropped}
            self.dropped = 0
        return event


class EventLog:
    """Transition events of one journal group at `path` (and `path`.1), fed to followers."""

    def __init__(
        self,
        path: Path,
        group: str,
        role_fn: Callable[[], str],
        max_bytes: int = EVENT_LOG_BYTES_MAX,
        queue_max: int = FOLLOW_QUEUE_MAX,
    ) -> None:
        if max_bytes <= 0 or queue_max <= 0:
            raise ValueError("max_bytes and queue_max must be positive")
        self.path = Path(path)
        self.old_path = self.path.with_name(self.path.name + ".1")
        self.group = group
        self._role_fn = role_fn  # a function: the role changes with takeover and swap resync
        self._max_bytes = max_bytes
        self._queue_max = queue_max
        self._followers: set[_Follower] = set()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    @property
    def followers(self) -> int:
        """How many iterators from follow() are open."""
        return len(self._followers)

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(event)`` after each event is written, in emit order."""
        self._listeners.append(listener)

    def emit(self, old: str, new: str, reason: str, **extra: Any) -> dict[str, Any]:
        """Record the transition old -> new; returns the event as written and delivered."""
        event = self._event(TRANSITION, str(old), str(new), reason, extra)
        fields = {"group": self.group, "role": event["role"], "state": event["new"], "old": old}
        fields.update(_log_fields(extra))
        log.info("%s -> %s: %s", old, new, reason, extra={**fields, "event": TRANSITION})
        return self._deliver(event)

    def notice(
        self, kind: str, state: str, reason: str, level: int = logging.INFO, **extra: Any
    ) -> dict[str, Any]:
        """Record an event of ``kind`` that changes no state (e.g. the lag crossed the RPO
        target); it goes to the same file, followers, listeners and hook as transitions."""
        if kind == TRANSITION:
            raise ValueError("a transition goes through emit()")
        event = self._event(kind, str(state), str(state), reason, extra)
        fields = {"group": self.group, "role": event["role"], "state": event["new"], "event": kind}
        fields.update(_log_fields(extra))
        log.log(level, "%s in %s: %s", kind, state, reason, extra=fields)
        return self._deliver(event)

    def _event(
        self, kind: str, old: str, new: str, reason: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        clash = [key for key in _RESERVED if key in extra]
        if clash:
            raise ValueError(f"event keys reserved: {', '.join(clash)}")
        return {
            "time": _now_iso(),
            "group": self.group,
            "role": str(self._role_fn()),
            "kind": kind,
            "old": old,
            "new": new,
            "reason": reason,
            **extra,
        }

    def _deliver(self, event: dict[str, Any]) -> dict[str, Any]:
        self._append(json.dumps(event, separators=(",", ":"), default=str) + "\n")
        old, new = event["old"], event["new"]
        for follower in self._followers:
            follower.offer(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # the transition is persisted already; it must not fail here
                log.exception("event listener %r failed on %s -> %s", listener, old, new)
        return event

    def _append(self, line: str) -> None:
        data = line.encode()
        try:
            self._rotate_if_full(len(data))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)  # one write to an O_APPEND file: the line is never split
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot append to event log %s: %s", self.path, exc.strerror or exc)

    def _rotate_if_full(self, adding_bytes: int) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if size and size + adding_bytes > self._max_bytes:
            os.replace(self.path, self.old_path)

    def history(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The last `limit` events, oldest first, from the rotated and the current file."""
        if limit <= 0:
            return []
        events: list[dict[str, Any]] = []
        for path in (self.old_path, self.path):
            events.extend(self._read(path))
        return events[-limit:]

    def _read(self, path: Path) -> list[dict[str, Any]]:
        # Read at most a file's worth from the end: a file we did not write stays bounded.
        budget = self._max_bytes + (64 << 10)
        try:
            with open(path, "rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(0, size - budget))
                data = file.read(budget)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read event log %s: %s", path, exc.strerror or exc)
            return []
        events: list[dict[str, Any]] = []
        corrupt = 0
        for raw in data.splitlines():
            try:
                event = json.loads(raw)
            except (ValueError, RecursionError):  # includes a bad UTF-8 sequence
                event = None
            if isinstance(event, dict):
                events.append(event)
            elif raw.strip():
                corrupt += 1
        if corrupt:
            log.warning("skipped %d corrupt line(s) in event log %s", corrupt, path)
        return events

    async def follow(self, backlog: int = 0) -> AsyncGenerator[dict[str, Any], None]:
        """The last `backlog` events from history, then every new event, until closed.

        The subscription starts when the iterator is first advanced; history is read in the
        same step, so no event falls between the two or appears in both.
        """
        follower = _Follower(self._queue_max)
        self._followers.add(follower)
        try:
            for event in self.history(backlog):
                yield event
            while True:
                yield await follower.next()
        finally:
            self._followers.discard(follower)
