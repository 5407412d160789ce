"""The pair.hook command: run once per pair event (transition or notice), in order, never in
the way.

    EventLog.emit ── listener ──► submit(event)          (loop thread, never blocks)
                                    │ bounded deque (full: drop the oldest, count, ERROR)
                                    ▼
    worker task (one) ── next event ── create_subprocess_exec(argv), no shell
        │   stdin /dev/null, own process group, env = os.environ + JP_* (the event)
        │   stdout+stderr read (first 4 KiB kept) ── until exit, at most timeout_s
        ├─ exit 0                 ── DEBUG with the output
        ├─ exit != 0              ── WARNING with the code and the output
        ├─ timeout                ── SIGKILL to the process group, WARNING
        └─ cannot start (ENOENT)  ── WARNING for this event, on to the next
    stop() ── let the worker finish the queue for at most stop_wait_s, then cancel it
              (a hook still running is killed with its process group)

One hook runs at a time, in transition order: a failover manager must see PAIR -> PSUE before
PSUE -> COPY. The transition itself was persisted before it was emitted (invariant 6); a slow,
failing or missing hook only produces log lines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["HOOK_OUTPUT_BYTES_MAX", "HOOK_QUEUE_MAX", "HOOK_STOP_WAIT_S", "HookRunner"]

log = logging.getLogger("journalpair.hooks")

HOOK_QUEUE_MAX = 1000  # transitions waiting for their hook run
HOOK_OUTPUT_BYTES_MAX = 4 << 10  # of a hook's stdout+stderr, kept for the log line
HOOK_STOP_WAIT_S = 5.0  # at shutdown, how long queued hooks may still run
_READ_CHUNK_BYTES = 64 << 10
_REAP_WAIT_S = 5.0  # after SIGKILL; only a process stuck in the kernel takes longer


class HookRunner:
    """Runs ``argv`` for each submitted transition event, one at a time, in order."""

    def __init__(
        self,
        argv: Sequence[str],
        timeout_s: float,
        *,
        group: str,
        role: str,
        queue_max: int = HOOK_QUEUE_MAX,
        stop_wait_s: float = HOOK_STOP_WAIT_S,
    ) -> None:
        if not argv:
            raise ValueError("a hook needs a command")
        if timeout_s <= 0 or queue_max <= 0 or stop_wait_s < 0:
            raise ValueError("timeout_s and queue_max must be positive, stop_wait_s not negative")
        self.argv = tuple(argv)
        self.timeout_s = timeout_s
        self.group = group
        self.role = role  # the event's own role wins: it follows a takeover or swap
        self.dropped = 0  # events whose hook never ran because the queue was full
        self._queue_max = queue_max
        self._stop_wait_s = stop_wait_s
        self._pending: collections.deque[Mapping[str, Any]] = collections.deque()
        self._dropped_unreported = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Events submitted whose hook has not started yet."""
        return len(self._pending)

    def start(self, tasks: asyncio.TaskGroup | None = None) -> None:
        """Start the worker (in ``tasks`` when given); events submitted before wait for it."""
        if self._task is not None:
            raise RuntimeError("hook runner already started")
        work = self._work()
        if tasks is None:
            self._task = asyncio.get_running_loop().create_task(work, name="hooks")
        else:
            self._task = tasks.create_task(work, name="hooks")

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue the hook run for ``event``; returns at once, whatever the hook does."""
        if self._closing:
            log.warning("hook not run for %s: the daemon is stopping", _transition(event))
            return
        if len(self._pending) >= self._queue_max:
            lost = self._pending.popleft()
            self.dropped += 1
            self._dropped_unreported += 1
            if self._dropped_unreported == 1:  # once per overflow, not once per event
                log.error(
                    "hook queue full (%d events): dropping the oldest (%s) and counting",
                    self._queue_max,
                    _transition(lost),
                )
        self._pending.append(event)
        self._wakeup.set()

    async def stop(self) -> None:
        """Run what is queued for at most stop_wait_s, then cancel (killing a running hook)."""
        self._closing = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._stop_wait_s):
                await asyncio.shield(task)
        if not task.done():
            log.warning(
                "stopping: gave up on hooks after %s s (%d queued events not run)",
                self._stop_wait_s,
                len(self._pending),
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            event = self._pending.popleft()
            if self._dropped_unreported:
                # Like a follower of the event feed: the next hook learns how many it missed.
                event = {**event, "dropped": self._dropped_unreported}
                log.error("hook queue overflowed: %d events dropped", self._dropped_unreported)
                self._dropped_unreported = 0
            try:
                await self._run(event)
            except Exception:  # a bug here must not end the worker or the daemon
                log.exception("hook for %s failed", _transition(event))

    async def _run(self, event: Mapping[str, Any]) -> None:
        what = _transition(event)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._environment(event),
                start_new_session=True,  # its own process group: a timeout kills it all
            )
        except OSError as exc:
            log.warning("hook %s for %s: cannot run: %s", self.argv[0], what, exc.strerror or exc)
            return
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                output, code = await asyncio.gather(_read_capped(proc.stdout), proc.wait())
        except TimeoutError:
            await _kill_group(proc)
            log.warning(
                "hook %s for %s: no exit after %s s: killed its process group",
                self.argv[0],
                what,
                self.timeout_s,
            )
            return
        except asyncio.CancelledError:
            await _kill_group(proc)
            raise
        text = output.decode(errors="replace").rstrip()
        if code == 0:
            log.debug("hook %s for %s: exit 0%s", self.argv[0], what, _quoted(text))
        else:
            log.warning("hook %s for %s: exit code %d%s", self.argv[0], what, code, _quoted(text))

    def _environment(self, event: Mapping[str, Any]) -> dict[str, str]:
        values = {
            "JP_GROUP": event.get("group", self.group),
            "JP_ROLE": event.get("role", self.role),
            "JP_EVENT_KIND": event.get("kind", "transition"),
            "JP_OLD_STATE": event.get("old", ""),
            "JP_NEW_STATE": event.get("new", ""),
            "JP_REASON": event.get("reason", ""),
            "JP_TIME": event.get("time", ""),
            "JP_EVENT": json.dumps(event, separators=(",", ":"), default=str),
        }
        # An environment string cannot hold NUL; a reason may carry a peer's text.
        return {**os.environ, **{k: str(v).replace("\0", "") for k, v in values.items()}}


def _transition(event: Mapping[str, Any]) -> str:
    kind = event.get("kind", "transition")
    if kind != "transition":  # a notice (common.events): no state change to show
        return f"{kind} in {event.get('new', '?')}"
    return f"{event.get('old', '?')} -> {event.get('new', '?')}"


def _quoted(text: str) -> str:
    return f": {text}" if text else " (no output)"


async def _read_capped(stream: asyncio.StreamReader) -> bytes:
    """Everything up to EOF is read (a hook never blocks on a full pipe); the first 4 KiB kept."""
    kept = bytearray()
    more = 0
    while chunk := await stream.read(_READ_CHUNK_BYTES):
        room = HOOK_OUTPUT_BYTES_MAX - len(kept)
        kept += chunk[:room]
        more += max(0, len(chunk) - room)
    if more:
        kept += f"... ({more} more bytes)".encode()
    return bytes(kept)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the hook's process group (its children too) and reap it, bounded."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the pid
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_REAP_WAIT_S):
            await proc.wait()
