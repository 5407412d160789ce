"""Follow a long operation until the pair is PAIR: `pairctl create|resync|takeover --wait`.

    the operation was accepted (COPY started, or the roles swapped)
      │ every FOLLOW_POLL_S: display
      │   judge(result): primary, PAIR or PFUL ──── DONE
      │                  primary, COPY ──────────── going: the bar moves / a line if changed
      │                  primary, any other state ─ ENDED ("pair is PSUE: reason")
      │                  secondary, or no answer ── a swap restarting the daemon as the
      │                                             primary: going, for UNSETTLED_MAX_S at most
      └ a terminal: a rich progress bar (percent, bytes, the daemon's rate and ETA);
        otherwise one plain line each time the state or the whole percent changes

Like HUR's paircreate and pairevtwait: the operation itself returns at once, and following
it is a client-side poll of `display`, so Ctrl-C stops watching, never the copy.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TextIO

from common.control import ControlError
from common.displaytext import copy_text, duration, human_size, percent, text

__all__ = ["FollowEnd", "Verdict", "follow", "judge", "progress_line"]

FOLLOW_POLL_S = 0.5
UNSETTLED_MAX_S = 60.0  # no answer, or still the secondary: a swap takes seconds, not this
_PAIRED = ("PAIR", "PFUL")


class Verdict(enum.Enum):
    GOING = "going"
    DONE = "done"
    ENDED = "ended"  # in a state that is neither the copy nor PAIR
    UNSETTLED = "unsettled"  # this site is not the primary (yet)


class FollowEnd(enum.Enum):
    DONE = "done"
    ENDED = "ended"
    UNSETTLED = "unsettled"
    UNREACHABLE = "unreachable"


def judge(result: Mapping[str, Any]) -> Verdict:
    """Where an operation that leaves this site the primary in COPY, then PAIR, stands."""
    if result.get("role") != "primary":
        return Verdict.UNSETTLED
    state = result.get("state")
    if state in _PAIRED:
        return Verdict.DONE
    return Verdict.GOING if state == "COPY" else Verdict.ENDED


def _copy(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    copy = result.get("copy")
    return copy if isinstance(copy, Mapping) else None


def progress_line(result: Mapping[str, Any]) -> str:
    """'pair jg0: COPY 12.0% (7.7 MiB of 64.0 MiB), 5.1 MiB/s, ETA 11 s', or the state and
    reason when there is no copy to show."""
    head = (
        f"pair {text(result.get('group'))}: {text(result.get('role'))} {text(result.get('state'))}"
    )
    copy = _copy(result)
    if copy is not None:
        return f"{head} {copy_text(copy)}"
    return f"{head} ({text(result.get('reason'))})"


def _copied(copy: Mapping[str, Any]) -> object:
    """What the secondary applied (the primary knows it), else what was sent."""
    return copy.get("applied_bytes", copy.get("done_bytes"))


def _change(result: Mapping[str, Any]) -> tuple[object, ...]:
    """What makes a new plain line: the role, the state, the whole percent of the copy."""
    copy = _copy(result)
    whole = percent(_copied(copy), copy.get("total_bytes")) if copy else ""
    return result.get("role"), result.get("state"), whole.split(".")[0]


class View(Protocol):
    def show(self, result: Mapping[str, Any]) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


class LineView:
    """Not a terminal (a log, a script): one line per change, nothing redrawn."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last: tuple[object, ...] | None = None
        self._last_note = ""

    def show(self, result: Mapping[str, Any]) -> None:
        change = _change(result)
        if change != self._last:
            self._last, self._last_note = change, ""
            self._out.write(progress_line(result) + "\n")
            self._out.flush()

    def note(self, message: str) -> None:
        if message != self._last_note:
            self._last, self._last_note = None, message
            self._out.write(message + "\n")
            self._out.flush()

    def close(self) -> None:
        pass


class BarView:
    """A terminal: one rich progress bar, redrawn in place, left on screen at the end."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console  # only here: the import costs ~50 ms
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=Console(file=out),
        )
        self._task = self._progress.add_task("starting", total=None, detail="")
        self._progress.start()

    def show(self, result: Mapping[str, Any]) -> None:
        title = f"{text(result.get('group'))} {text(result.get('state'))}"
        copy = _copy(result)
        if copy is not None and isinstance(copy.get("total_bytes"), int):
            copied, total = _copied(copy), copy["total_bytes"]
            completed = min(copied, total) if isinstance(copied, int) else 0
            detail = _bar_detail(completed, total, copy)
        elif judge(result) is Verdict.DONE:
            detail, total, completed = text(result.get("reason")), 1, 1
        else:
            detail, total, completed = f"{text(result.get('role'))}: waiting", None, 0
        self._progress.update(
            self._task, description=title, total=total, completed=completed, detail=detail
        )

    def note(self, message: str) -> None:
        self._progress.update(self._task, detail=message)

    def close(self) -> None:
        self._progress.stop()


def _bar_detail(copied: int, total: int, copy: Mapping[str, Any]) -> str:
    """Beside the bar, short enough for 80 columns: '64.0 MiB of 256.0 MiB, 8.2 MiB/s,
    ETA 23.5 s' (the plain lines and display also say how much was sent)."""
    line = f"{human_size(copied)} of {human_size(total)}"
    rate, eta = copy.get("rate_bytes_per_s"), copy.get("eta_s")
    if isinstance(rate, int | float):
        line += f", {human_size(rate)}/s"
        line += f", ETA {duration(eta)}" if isinstance(eta, int | float) else ""
    return line


def view_for(out: TextIO) -> View:
    return BarView(out) if out.isatty() else LineView(out)


async def follow(
    fetch: Callable[[], Awaitable[Mapping[str, Any]]], view: View
) -> tuple[FollowEnd, Mapping[str, Any] | None]:
    """Poll `fetch` (display) until the pair is PAIR or ends otherwise; the last result."""
    loop = asyncio.get_running_loop()
    unsettled_since: float | None = None
    last: Mapping[str, Any] | None = None
    try:
        while True:
            try:
                last = await fetch()
            except ControlError as exc:  # a swap restarts the daemon: no socket for a moment
                verdict, why = Verdict.UNSETTLED, f"no answer from the daemon: {exc}"
                ended = FollowEnd.UNREACHABLE
            else:
                verdict, why, ended = judge(last), "", FollowEnd.UNSETTLED
                view.show(last)
            if verdict is Verdict.DONE:
                return FollowEnd.DONE, last
            if verdict is Verdict.ENDED:
                return FollowEnd.ENDED, last
            if verdict is Verdict.UNSETTLED:
                if unsettled_since is None:
                    unsettled_since = loop.time()
                if why:
                    view.note(why)
                if loop.time() - unsettled_since > UNSETTLED_MAX_S:
                    return ended, last
            else:
                unsettled_since = None
            await asyncio.sleep(FOLLOW_POLL_S)
    finally:
        view.close()
