"""pairctl: operate a pair through the control socket of the daemon whose config is given.

    pairctl --config FILE VERB [options]
        │ load_config(FILE) ── ConfigError: "pairctl: config error: ..." exit 2
        │ config.control: the daemon's socket
        ├ create / split / resync / delete: call(verb, args) ── print result["message"], exit 0
        ├ takeover: call ── exit result["exit_code"] (horctakeover style: 0, 1 swap, 2 SSWS)
        │   create, resync, takeover --wait: then pairfollow.follow until PAIR (else exit 4)
        ├ display [--json] [--watch [S]]: call("display") ── render_display / JSON
        │   --watch: in a terminal each frame redraws the last in place; else blocks follow
        ├ wait STATE [--timeout S]: poll display every 0.2 s (client side, like pairevtwait)
        └ events [--follow]: call("events") / stream("events") ── JSON lines
    refused: "pairctl: <reason>", the daemon's exit code; daemon unreachable: exit 3

Rendering is pure (`render_display`), so the table is tested without a daemon. Expected
failures are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from common.config import ConfigError, load_config
from common.control import ControlError, ControlRefused, call, stream
from common.displaytext import human_size, render_display, text
from common.pairfollow import UNSETTLED_MAX_S, FollowEnd, follow, view_for
from common.pairstate import PairState

__all__ = ["human_size", "main", "render_display", "run"]

EXIT_OK = 0
EXIT_FAILED = 1  # refused (unless the daemon says otherwise), wait timeout
EXIT_USAGE = 2  # bad command line or config
EXIT_UNREACHABLE = 3  # no answer from the daemon
EXIT_NOT_REACHED = 4  # --wait: the operation started, but the pair ended in another state
EXIT_INTERRUPTED = 130  # Ctrl-C during an operation or a wait

TAKEOVER_SWAP = 1  # horctakeover's exit code for a swap takeover
WAIT_TIMEOUT_S = 60.0
WAIT_POLL_S = 0.2
DISPLAY_TIMEOUT_S = 10.0  # display answers from memory
OPERATION_TIMEOUT_S = 120.0  # split drains the journal to the secondary before answering
WATCH_INTERVAL_S = 1.0
# --watch in a terminal redraws in place, as watch(1) does: the first frame clears the
# screen, each later one goes to the top left and overwrites, clearing the rest of each line
# and what is below the frame, so nothing scrolls or flickers; the cursor is hidden meanwhile.
_CLEAR_SCREEN = "\x1b[H\x1b[2J"
_HOME = "\x1b[H"
_CLEAR_TO_EOL = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"
_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"

_EPILOG = """\
exit status:
  0  done (or the state was reached, for wait)
  1  refused (the daemon's reason is printed), or wait timed out
  2  bad command line or config file
  3  the daemon cannot be reached or did not answer
  4  --wait: the operation started, but the pair ended in another state than PAIR
  takeover exits like horctakeover: 0 nothing to do, 1 swap takeover, 2 S-VOL takeover (SSWS).
  A swap takeover makes this site the primary and the old primary its secondary; an S-VOL
  takeover write-enables this site's volumes because the primary did not answer.
  Other codes come from the daemon's refusal (70: a bug in the daemon, 75: try again).
"""


def _err(message: str) -> None:
    print(f"pairctl: {message}", file=sys.stderr)


# --- verbs ----------------------------------------------------------------------------------


def _print_message(result: Mapping[str, Any]) -> None:
    message = result.get("message")
    if isinstance(message, str) and message:
        print(text(message))


async def _operate(control: Path, args: argparse.Namespace) -> int:
    verb_args: dict[str, Any] = {}
    if args.verb == "split":
        verb_args["rw"] = args.rw
    elif args.verb == "resync":
        verb_args["swap"] = args.swap
        verb_args["discard_secondary"] = args.discard_secondary
    result = await call(control, args.verb, verb_args, timeout_s=OPERATION_TIMEOUT_S)
    _print_message(result)
    if getattr(args, "wait", False):
        return await _follow(control, EXIT_OK)
    return EXIT_OK


async def _takeover(control: Path, args: argparse.Namespace) -> int:
    result = await call(control, "takeover", {}, timeout_s=OPERATION_TIMEOUT_S)
    _print_message(result)
    code = result.get("exit_code")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        _err(f"bad answer from the daemon at {control}: takeover result has no exit_code")
        return EXIT_FAILED
    if args.wait and code == TAKEOVER_SWAP:  # SSWS or nothing done: there is no pair to follow
        return await _follow(control, code)
    return code


async def _follow(control: Path, done_code: int) -> int:
    """After an accepted create, resync or swap: follow the pair until PAIR (`done_code`)."""
    end, last = await follow(
        lambda: call(control, "display", {}, DISPLAY_TIMEOUT_S), view_for(sys.stdout)
    )
    seen: Mapping[str, Any] = last or {}
    state, role, reason = (text(seen.get(key)) for key in ("state", "role", "reason"))
    if end is FollowEnd.DONE:
        print(f"pair is {state}")
        return done_code
    if end is FollowEnd.UNREACHABLE:
        _err(f"the daemon at {control} did not answer for {UNSETTLED_MAX_S:g} s while following")
        return EXIT_UNREACHABLE
    if end is FollowEnd.UNSETTLED:
        _err(f"this site is still the {role} ({state}) after {UNSETTLED_MAX_S:g} s")
    else:
        _err(f"the pair did not reach PAIR: pair is {state} ({reason})")
    return EXIT_NOT_REACHED


def _render(result: Mapping[str, Any], as_json: bool) -> str:
    return json.dumps(result, sort_keys=True) + "\n" if as_json else render_display(result)


def _in_place(block: str, first: bool) -> str:
    """A frame for a terminal: drawn over the last one from the top left (see _HOME)."""
    lines = block.rstrip("\n").split("\n")
    start = _HIDE_CURSOR + _CLEAR_SCREEN if first else _HOME
    return start + "\n".join(line + _CLEAR_TO_EOL for line in lines) + "\n" + _CLEAR_BELOW


async def _display(control: Path, args: argparse.Namespace) -> int:
    if args.watch is None:
        sys.stdout.write(_render(await call(control, "display", {}, DISPLAY_TIMEOUT_S), args.json))
        return EXIT_OK
    in_place = sys.stdout.isatty() and not args.json
    try:
        await _watch(control, args, in_place)
    finally:
        if in_place:
            sys.stdout.write(_SHOW_CURSOR)
            sys.stdout.flush()
    return EXIT_OK  # not reached: a watch ends with Ctrl-C


async def _watch(control: Path, args: argparse.Namespace, in_place: bool) -> None:
    first = True
    while True:  # until Ctrl-C; a daemon that goes away is shown, and watched for its return
        try:
            block = _render(await call(control, "display", {}, DISPLAY_TIMEOUT_S), args.json)
        except ControlError as exc:
            block = f"pairctl: {exc}\n"
        if in_place:
            block = _in_place(block, first)
        elif not first and not args.json:
            block = "\n" + block
        sys.stdout.write(block)
        sys.stdout.flush()
        first = False
        await asyncio.sleep(args.watch)


async def _wait(control: Path, args: argparse.Namespace) -> int:
    want: str = args.state
    timeout_s: float = args.timeout
    deadline = time.monotonic() + timeout_s
    seen: object = None
    unreachable: ControlError | None = None
    while True:
        call_timeout_s = min(max(deadline - time.monotonic(), WAIT_POLL_S), DISPLAY_TIMEOUT_S)
        try:
            result = await call(control, "display", {}, call_timeout_s)
        except ControlError as exc:  # the daemon may be restarting: keep polling
            unreachable = exc
        else:
            unreachable, seen = None, result.get("state")
            if seen == want:
                print(f"pair is {want}")
                return EXIT_OK
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            break
        await asyncio.sleep(min(WAIT_POLL_S, remaining_s))
    waiting = f"after {timeout_s:g} s (waiting for {want})"
    if unreachable is None:
        _err(f"timeout: pair is {text(seen)} {waiting}")
    else:
        last = "" if seen is None else f"; last seen {text(seen)}"
        _err(f"timeout: the daemon did not answer {waiting}{last}: {unreachable}")
    return EXIT_FAILED


async def _events(control: Path, args: argparse.Namespace) -> int:
    if not args.follow:
        result = await call(control, "events", {"follow": False}, DISPLAY_TIMEOUT_S)
        events = result.get("events")
        if not isinstance(events, list):
            _err(f"bad answer from the daemon at {control}: no events list")
            return EXIT_FAILED
        for event in events:
            print(json.dumps(event))
        return EXIT_OK
    async for event in stream(control, "events", {"follow": True}):
        print(json.dumps(event), flush=True)
    _err(f"the daemon at {control} ended the event stream")
    return EXIT_UNREACHABLE


_Verb = Callable[[Path, argparse.Namespace], Awaitable[int]]
_VERBS: Mapping[str, _Verb] = {
    "create": _operate,
    "split": _operate,
    "resync": _operate,
    "delete": _operate,
    "takeover": _takeover,
    "display": _display,
    "wait": _wait,
    "events": _events,
}
_ENDLESS = ("display", "events")  # Ctrl-C is how a watch or a follow ends: exit 0


async def _run_verb(control: Path, args: argparse.Namespace) -> int:
    try:
        return await _VERBS[args.verb](control, args)
    except ControlRefused as exc:
        _err(exc.reason)
        return exc.exit_code
    except ControlError as exc:
        _err(str(exc))
        return EXIT_UNREACHABLE


# --- command line ---------------------------------------------------------------------------


def _state_name(text: str) -> str:
    name = text.upper()
    if name not in PairState.__members__:
        names = ", ".join(PairState.__members__)
        raise argparse.ArgumentTypeError(f"unknown state {text!r} (one of {names})")
    return name


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"seconds must be more than 0: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the problem and where help is), not usage text and then it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


_WAIT_HELP = (
    "once accepted, follow the pair until PAIR with its copy progress (a bar in a terminal, "
    "one line per change otherwise); exit 4 if it ends in another state"
)


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the verb; SUPPRESS keeps a subparser from
    # overwriting a value given before the verb with its own default.
    config = _Parser(add_help=False)
    config.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="YAML config")
    parser = _Parser(
        prog="pairctl",
        description="Operate a journalpair pair through the control socket of the daemon "
        "whose config is FILE.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="the daemon's YAML config (required)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)

    def verb(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help_text, parents=[config], **kwargs)

    create = verb("create", "pair the volumes: SMPL -> COPY (initial copy) -> PAIR")
    split = verb("split", "suspend the pair after flushing the journal (PSUS/SSUS)")
    split.add_argument("--rw", action="store_true", help="make the S-VOL writable (SSWS)")
    resync = verb("resync", "resume a suspended pair, copying only what changed")
    resync.add_argument("--swap", action="store_true", help="reverse the copy direction")
    for follows in (create, resync):
        follows.add_argument("--wait", action="store_true", help=_WAIT_HELP)
    resync.add_argument(
        "--discard-secondary",
        action="store_true",
        help="after a split brain (both sites written while split): the primary wins, the "
        "secondary's writes are overwritten",
    )
    verb("delete", "dissolve the pair: SMPL on both sides")
    takeover = verb(
        "takeover",
        "run on the secondary: take over the primary role",
        description="Take over on the secondary: a swap when the primary answers, else SSWS. "
        "Exit status: 0 nothing to do, 1 swap takeover, 2 S-VOL takeover (SSWS).",
    )
    takeover.add_argument("--wait", action="store_true", help=_WAIT_HELP + " (after a swap)")
    display = verb("display", "show the pair's state, lag, journal use and volumes")
    display.add_argument("--json", action="store_true", help="one JSON object (sort_keys)")
    display.add_argument(
        "--watch",
        nargs="?",
        const=WATCH_INTERVAL_S,
        type=_positive_seconds,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {WATCH_INTERVAL_S:g}) until Ctrl-C",
    )
    wait = verb("wait", "wait until the pair reaches STATE (exit 0) or the timeout (exit 1)")
    wait.add_argument("state", type=_state_name, metavar="STATE", help="a pair state, e.g. PAIR")
    wait.add_argument(
        "--timeout",
        type=_seconds,
        default=WAIT_TIMEOUT_S,
        metavar="S",
        help=f"give up after S seconds (default {WAIT_TIMEOUT_S:g})",
    )
    events = verb("events", "print the transition events as JSON lines")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace | int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.config is None:
            parser.error("the following arguments are required: --config")
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return args


def run(argv: list[str] | None = None) -> int:
    """pairctl with `argv` (default sys.argv[1:]); returns the exit status."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    try:
        control = load_config(args.config).control
    except ConfigError as exc:
        _err(f"config error: {exc}")
        return EXIT_USAGE
    try:
        return asyncio.run(_run_verb(control, args))
    except KeyboardInterrupt:
        return EXIT_OK if args.verb in _ENDLESS else EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # `pairctl events | head -1`: the reader left; say nothing more (Python's recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_FAILED
    sys.exit(code)
