"""pairctl against a real ControlServer (its own thread and loop) with fake handlers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from common.control import ControlRefused, ControlServer, Handler, StreamHandler
from common.displaytext import duration
from common.pairctl import human_size, render_display, run

T = TypeVar("T")
GiB = 1 << 30

CONFIG = """\
role: primary
group: jg0
data_dir: data
listen:
  nbd: 127.0.0.1:10809
  replication: 127.0.0.1:7410
control: ctl.sock
journal:
  capacity: 1GiB
volumes:
  - {name: vol0, path: data/vol0.img, size: 1GiB}
"""

DISPLAY: dict[str, Any] = {
    "group": "jg0",
    "role": "primary",
    "state": "COPY",
    "reason": "create by operator",
    "generation": 3,
    "link": {"up": True, "peer": "127.0.0.1:7411", "since": "2024-05-01T12:00:00.000Z"},
    "seq": {"last": 1200, "restored": 1190, "applied": 1180},
    "volumes": [
        {"name": "vol0", "size": GiB, "path": "/srv/jp/vol0.img"},
        {"name": "logs", "size": 64 << 20, "path": "/srv/jp/logs.img"},
    ],
    "lag": {"entries": 10, "bytes": 1536, "seconds": 0.25},
    "journal": {"used_bytes": 256 << 20, "capacity_bytes": GiB},
    "copy": {"done_bytes": 512 << 20, "total_bytes": GiB},
}


class DaemonThread:
    """A ControlServer on its own event loop in a thread, as a daemon would run it."""

    def __init__(
        self, path: Path, handlers: Mapping[str, Handler], streams: Mapping[str, StreamHandler]
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = ControlServer(path, handlers, streams)
        self._submit(self.server.start())

    def _submit(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=5)

    def close(self) -> None:
        self._submit(self.server.stop())
        self._submit(self._loop.shutdown_asyncgens())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "jp.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def daemon(config: Path) -> Iterator[Callable[..., DaemonThread]]:
    started: list[DaemonThread] = []

    def start(
        handlers: Mapping[str, Handler], streams: Mapping[str, StreamHandler] | None = None
    ) -> DaemonThread:
        thread = DaemonThread(config.parent / "ctl.sock", handlers, streams or {})
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.close()


def pairctl(config: Path, *argv: str) -> int:
    return run(["--config", str(config), *argv])


def fixed(result: Mapping[str, Any], calls: list[Mapping[str, Any]] | None = None) -> Handler:
    async def handler(args: Mapping[str, Any]) -> Mapping[str, Any]:
        if calls is not None:
            calls.append(dict(args))
        return result

    return handler


def interrupt_after(seconds: float) -> threading.Timer:
    """Ctrl-C for the main thread, where run() waits in asyncio.run."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


# --- rendering without a daemon -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (GiB, "1.0 GiB"),
        (5 << 40, "5.0 TiB"),
        (1 << 60, "1024.0 PiB"),
        (None, "?"),
        (True, "?"),
        ("1GiB", "?"),
    ],
)
def test_human_size(value: object, text: str) -> None:
    assert human_size(value) == text


def test_render_display_aligns_values_and_humanizes() -> None:
    text = render_display(DISPLAY)
    lines = text.splitlines()
    summary = lines[: lines.index("")]
    assert summary == [
        "jg0  primary  COPY",
        "  reason      create by operator",
        "  copy        50.0% (512.0 MiB of 1.0 GiB)",
        "  lag         10 entries, 1.5 KiB, 0.2 s",
        "  journal     25.0% (256.0 MiB of 1.0 GiB)",
        "  link        up since 2024-05-01T12:00:00.000Z, peer 127.0.0.1:7411",
        "  seq         last 1200, restored 1190, applied 1180",
        "  generation  3",
    ]
    assert lines[lines.index("") + 1 :] == [
        "VOLUME      SIZE  PATH",
        "vol0     1.0 GiB  /srv/jp/vol0.img",
        "logs    64.0 MiB  /srv/jp/logs.img",
    ]


def test_render_display_minimal_and_garbled_results_do_not_crash() -> None:
    minimal = {"group": "jg0", "role": "secondary", "state": "SMPL", "reason": ""}
    assert render_display(minimal) == "jg0  secondary  SMPL\n  reason  -\n"
    garbled = {
        "state": "PAIR",
        "lag": {"entries": 0},
        "journal": {"used_bytes": 5, "capacity_bytes": 0},
        "link": {"up": False, "for_s": "soon"},
        "volumes": [{"name": "v"}, "junk"],
        "copy": "not a mapping",
        "peer": {"silent_s": None},
        "bitmap": {"dirty_bytes": -1.5},
    }
    lines = [" ".join(line.split()) for line in render_display(garbled).splitlines()]
    assert lines == [
        "- - PAIR",
        "reason -",
        "lag 0 entries, ?, ? s",
        "journal - (5 B of 0 B)",
        "bitmap -1 B dirty",
        "link down",
        "secondary never connected",
        "",
        "VOLUME SIZE PATH",
        "v ? -",
    ]


# A primary's display as the daemons send it now (see README: display --json)
PRIMARY_COPY: dict[str, Any] = {
    **DISPLAY,
    "copy": {
        "done_bytes": 768 << 20,
        "total_bytes": GiB,
        "applied_bytes": 512 << 20,
        "rate_bytes_per_s": 64 << 20,
        "eta_s": 8.0,
    },
    "bitmap": {"dirty_bytes": 0},
    "link": {**DISPLAY["link"], "for_s": 125.4},
    "peer": {
        "state": "SMPL",
        "written_while_split": False,
        "sent_state": "COPY",
        "restored_seq": 1190,
        "applied_seq": 1180,
        "silent_s": 0.1,
    },
}


def rows(text: str) -> dict[str, str]:
    """The key/value rows under the title line, keyed by name."""
    found = {}
    for line in text.splitlines()[1:]:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition("  ")
        found[key] = value.strip()
    return found


def test_render_copy_shows_applied_percent_sent_rate_and_eta() -> None:
    shown = rows(render_display(PRIMARY_COPY))
    assert (
        shown["copy"] == "50.0% applied (512.0 MiB of 1.0 GiB), 75.0% sent, 64.0 MiB/s, ETA 8.0 s"
    )
    assert shown["link"] == ("up for 2m05s (since 2024-05-01T12:00:00.000Z), peer 127.0.0.1:7411")
    assert shown["bitmap"] == "0 B dirty"


def test_render_copy_before_the_rate_is_known_and_long_etas() -> None:
    measuring = {**PRIMARY_COPY["copy"], "rate_bytes_per_s": None, "eta_s": None}
    shown = rows(render_display({**PRIMARY_COPY, "copy": measuring}))
    assert shown["copy"].endswith("75.0% sent, rate not measured yet")
    slow = {**PRIMARY_COPY["copy"], "rate_bytes_per_s": 1024, "eta_s": 2 * 86400 + 3 * 3600}
    assert rows(render_display({**PRIMARY_COPY, "copy": slow}))["copy"].endswith(
        "1.0 KiB/s, ETA 2d03h"
    )
    stalled = {**PRIMARY_COPY["copy"], "rate_bytes_per_s": 0, "eta_s": None}
    assert rows(render_display({**PRIMARY_COPY, "copy": stalled}))["copy"].endswith("0 B/s, ETA -")


def test_render_primary_shows_its_view_of_the_secondary() -> None:
    assert rows(render_display(PRIMARY_COPY))["secondary"] == (
        "COPY, restored 1190, applied 1180, heard 0.1 s ago"
    )
    down = {
        **PRIMARY_COPY,
        "link": {"up": False, "since": "2024-05-01T12:00:00Z", "for_s": 3700.0},
        "peer": {**PRIMARY_COPY["peer"], "sent_state": "", "state": "PSUE", "silent_s": 3700.0},
    }
    shown = rows(render_display(down))
    assert shown["link"] == "down for 1h01m (since 2024-05-01T12:00:00Z)"
    assert shown["secondary"] == (
        "PSUE at its last Hello, restored 1190, applied 1180, heard 1h01m ago"
    )


def test_render_psue_shows_the_reason_and_a_split_brain() -> None:
    reason = (
        "link lost: no read-journal from the secondary for 30 s (path_watch_s 30); the link is down"
    )
    psue = {
        **PRIMARY_COPY,
        "state": "PSUE",
        "reason": reason,
        "split_brain": True,
        "bitmap": {"dirty_bytes": 3 << 20},
        "peer": {**PRIMARY_COPY["peer"], "written_while_split": True},
    }
    del psue["copy"]
    text = render_display(psue)
    assert text.splitlines()[0] == "jg0  primary  PSUE"
    shown = rows(text)
    assert shown["reason"] == reason
    assert shown["SPLIT BRAIN"].startswith("hosts wrote both sites while split")
    assert shown["bitmap"] == "3.0 MiB dirty"
    assert shown["secondary"].endswith(", hosts wrote it while split")
    assert "copy" not in shown


def test_render_secondary_shows_its_view_of_the_primary() -> None:
    secondary = {
        "group": "jg0",
        "role": "secondary",
        "state": "COPY",
        "reason": "primary is COPY",
        "copy": {"done_bytes": 3 << 20, "total_bytes": 4 << 20, "rate_bytes_per_s": None},
        "link": {"up": True, "peer": "10.0.0.1:7410", "since": "x", "for_s": 4.0, "why": "ok"},
        "peer": {"sent_state": "PAIR", "last_seq": 1200, "silent_s": 0.0},
        "seq": {"primary_last": 1200, "restored": 1190, "applied": 1180},
        "destage_error": "seq 7: no volume named 'x' here",
    }
    shown = rows(render_display(secondary))
    assert shown["primary"] == "last seq 1200, heard 0.0 s ago, it says this site is PAIR"
    assert shown["copy"] == "75.0% sent (3.0 MiB of 4.0 MiB), rate not measured yet"
    assert shown["link"] == "up for 4.0 s (since x), peer 10.0.0.1:7410"
    assert shown["seq"] == "primary_last 1200, restored 1190, applied 1180"
    assert shown["DESTAGE"] == "stopped: seq 7: no volume named 'x' here"
    down = {**secondary, "link": {**secondary["link"], "up": False, "why": "refused"}}
    assert rows(render_display(down))["link"].endswith("peer 10.0.0.1:7410: refused")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0.0 s"),
        (59.94, "59.9 s"),
        (60, "1m00s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (86399, "23h59m"),
        (86400, "1d00h"),
        (-1, "?"),
        (None, "?"),
        (True, "?"),
    ],
)
def test_duration(seconds: object, text: str) -> None:
    assert duration(seconds) == text


# --- verbs against a daemon -----------------------------------------------------------------


def test_display_text_and_json(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Mapping[str, Any]] = []
    daemon({"display": fixed(DISPLAY, calls)})
    assert pairctl(config, "display") == 0
    out, err = capsys.readouterr()
    assert out == render_display(DISPLAY)
    assert err == ""
    assert pairctl(config, "display", "--json") == 0
    out, err = capsys.readouterr()
    assert out == json.dumps(DISPLAY, sort_keys=True) + "\n"
    assert json.loads(out) == DISPLAY
    assert calls == [{}, {}]


def test_config_may_follow_the_verb(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon({"display": fixed(DISPLAY)})
    assert run(["display", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "COPY"


def test_operations_send_their_args_and_print_the_message(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    calls: dict[str, list[Mapping[str, Any]]] = {v: [] for v in ("create", "split", "resync")}
    daemon({verb: fixed({"message": f"{verb} started"}, calls[verb]) for verb in calls})
    assert pairctl(config, "create") == 0
    assert pairctl(config, "split", "--rw") == 0
    assert pairctl(config, "split") == 0
    assert pairctl(config, "resync", "--swap") == 0
    assert pairctl(config, "resync", "--discard-secondary") == 0
    out, err = capsys.readouterr()
    started = ["create started", "split started", "split started"] + ["resync started"] * 2
    assert out.splitlines() == started
    assert err == ""
    assert calls == {
        "create": [{}],
        "split": [{"rw": True}, {"rw": False}],
        "resync": [
            {"swap": True, "discard_secondary": False},
            {"swap": False, "discard_secondary": True},
        ],
    }


def test_refused_operation_exits_with_the_reason(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    async def resync(args: Mapping[str, Any]) -> Mapping[str, Any]:
        raise ControlRefused("cannot resync: pair is PAIR")

    async def delete(args: Mapping[str, Any]) -> Mapping[str, Any]:
        raise ControlRefused("cannot delete: busy", exit_code=5)

    daemon({"resync": resync, "delete": delete})
    assert pairctl(config, "resync") == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", "pairctl: cannot resync: pair is PAIR\n")
    assert pairctl(config, "delete") == 5
    assert capsys.readouterr().err == "pairctl: cannot delete: busy\n"
    assert pairctl(config, "takeover") == 2  # not served by this fake: unknown verb
    assert capsys.readouterr().err == "pairctl: unknown verb takeover\n"


def test_wait_reaches_the_state_after_a_few_polls(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    polls = 0

    async def display(args: Mapping[str, Any]) -> Mapping[str, Any]:
        nonlocal polls
        polls += 1
        return {**DISPLAY, "state": "PAIR" if polls >= 3 else "COPY"}

    daemon({"display": display})
    assert pairctl(config, "wait", "pair", "--timeout", "10") == 0
    assert capsys.readouterr().out == "pair is PAIR\n"
    assert polls == 3


def test_wait_timeout_names_the_state_seen(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon({"display": fixed(DISPLAY)})
    assert pairctl(config, "wait", "PAIR", "--timeout", "0.5") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "pairctl: timeout: pair is COPY after 0.5 s (waiting for PAIR)\n"


def test_wait_keeps_polling_while_the_daemon_is_away(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pairctl(config, "wait", "PSUS", "--timeout", "0.5") == 1
    err = capsys.readouterr().err
    assert err.startswith("pairctl: timeout: the daemon did not answer after 0.5 s ")
    assert "(waiting for PSUS)" in err
    assert "cannot reach the daemon at" in err


def test_wait_sees_a_daemon_that_comes_back(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    timer = threading.Timer(0.5, daemon, ({"display": fixed({**DISPLAY, "state": "PAIR"})},))
    timer.start()
    try:
        assert pairctl(config, "wait", "PAIR", "--timeout", "10") == 0
    finally:
        timer.join()
    assert capsys.readouterr().out == "pair is PAIR\n"


def test_unreachable_daemon_exits_3(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pairctl(config, "display") == 3
    sock = config.parent / "ctl.sock"
    assert capsys.readouterr().err == (
        f"pairctl: cannot reach the daemon at {sock}: No such file or directory (is it running?)\n"
    )


def test_config_and_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("group: jg0", "group: jg0\ncolour: blue"))
    assert run(["--config", str(bad), "display"]) == 2
    assert capsys.readouterr().err == "pairctl: config error: colour: unknown key\n"
    assert run(["--config", str(tmp_path / "absent.yaml"), "display"]) == 2
    assert "pairctl: config error: " in capsys.readouterr().err
    assert run(["display"]) == 2
    assert "the following arguments are required: --config" in capsys.readouterr().err
    assert run(["--config", str(bad), "wait", "PAIRED"]) == 2
    assert "unknown state 'PAIRED'" in capsys.readouterr().err
    assert run(["--config", str(bad), "frobnicate"]) == 2
    assert run(["--config", str(bad), "display", "--watch", "0"]) == 2
    assert run(["--help"]) == 0
    assert "2 S-VOL takeover (SSWS)" in capsys.readouterr().out


@pytest.mark.parametrize("code", [0, 1, 2])
def test_takeover_exit_code_is_passed_through(
    config: Path,
    daemon: Callable[..., DaemonThread],
    capsys: pytest.CaptureFixture[str],
    code: int,
) -> None:
    daemon({"takeover": fixed({"exit_code": code, "message": f"takeover {code}"})})
    assert pairctl(config, "takeover") == code
    assert capsys.readouterr().out == f"takeover {code}\n"


def test_takeover_without_exit_code_is_an_error(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon({"takeover": fixed({"message": "done?"})})
    assert pairctl(config, "takeover") == 1
    assert "takeover result has no exit_code" in capsys.readouterr().err


EVENTS = [
    {"time": "2024-05-01T12:00:00.000Z", "old": "SMPL", "new": "COPY", "reason": "create"},
    {"time": "2024-05-01T12:00:05.000Z", "old": "COPY", "new": "PAIR", "reason": "copy done"},
]


def test_events_listing(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Mapping[str, Any]] = []
    daemon({"events": fixed({"events": EVENTS}, calls)})
    assert pairctl(config, "events") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == EVENTS
    assert calls == [{"follow": False}]


def test_events_follow_prints_until_ctrl_c(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    seen_args: list[Mapping[str, Any]] = []

    async def follow(args: Mapping[str, Any]) -> AsyncIterator[Mapping[str, Any]]:
        seen_args.append(args)
        for event in EVENTS:
            yield event
        await asyncio.sleep(3600)  # a quiet pair

    daemon({"events": fixed({"events": []})}, {"events": follow})  # as the daemons serve it
    timer = interrupt_after(0.5)
    try:
        assert pairctl(config, "events", "--follow") == 0
    finally:
        timer.join()
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == EVENTS
    assert err == ""
    assert seen_args == [{"follow": True}]


def test_events_follow_reports_the_end_of_the_stream(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    async def follow(args: Mapping[str, Any]) -> AsyncIterator[Mapping[str, Any]]:
        yield EVENTS[0]

    daemon({}, {"events": follow})
    assert pairctl(config, "events", "--follow") == 3
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == EVENTS[:1]
    assert "ended the event stream" in err


def test_display_watch_rerenders_until_ctrl_c(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Mapping[str, Any]] = []
    daemon({"display": fixed(DISPLAY, calls)})
    timer = interrupt_after(0.7)
    try:
        assert pairctl(config, "display", "--watch", "0.2") == 0
    finally:
        timer.join()
    out = capsys.readouterr().out
    # Not a tty: no ANSI clearing, blocks separated by a blank line.
    blocks = out.count("jg0  primary  COPY")
    assert blocks >= 2
    assert blocks in (len(calls), len(calls) - 1)  # Ctrl-C may land between answer and print
    assert out == "\n".join([render_display(DISPLAY)] * blocks)


# --- create / resync / takeover --wait: following the copy --------------------------------------


def answers(results: list[Mapping[str, Any]]) -> Handler:
    """display answers these in turn, then the last one again."""
    polls = 0

    async def handler(args: Mapping[str, Any]) -> Mapping[str, Any]:
        nonlocal polls
        polls += 1
        return results[min(polls, len(results)) - 1]

    return handler


def copy_at(applied: int) -> dict[str, Any]:
    copy = {**PRIMARY_COPY["copy"], "applied_bytes": applied, "done_bytes": applied}
    return {**PRIMARY_COPY, "copy": copy}


def test_create_wait_follows_the_copy_in_plain_lines(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    paired = {**DISPLAY, "state": "PAIR", "reason": "copy done"}
    del paired["copy"]
    shown = [copy_at(0), copy_at(0), copy_at(GiB // 4), copy_at(GiB // 4 + 1), paired]
    daemon({"create": fixed({"message": "pair jg0: COPY started"}), "display": answers(shown)})
    assert pairctl(config, "create", "--wait") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "pair jg0: COPY started",
        "pair jg0: primary COPY 0.0% applied (0 B of 1.0 GiB), 0.0% sent, 64.0 MiB/s, ETA 8.0 s",
        "pair jg0: primary COPY 25.0% applied (256.0 MiB of 1.0 GiB), 25.0% sent, "
        "64.0 MiB/s, ETA 8.0 s",
        "pair jg0: primary PAIR (copy done)",
        "pair is PAIR",
    ]
    assert err == ""


def test_resync_wait_exits_4_when_the_pair_ends_in_another_state(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    failed = {**DISPLAY, "state": "PSUE", "reason": "link lost: the link is down"}
    del failed["copy"]
    daemon({"resync": fixed({"message": "COPY started"}), "display": answers([copy_at(0), failed])})
    assert pairctl(config, "resync", "--wait") == 4
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "pair jg0: primary PSUE (link lost: the link is down)"
    assert (
        err == "pairctl: the pair did not reach PAIR: pair is PSUE (link lost: the link is down)\n"
    )


def test_takeover_wait_follows_only_a_swap(
    config: Path, daemon: Callable[..., DaemonThread], capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Mapping[str, Any]] = []
    paired = {**DISPLAY, "state": "PAIR", "reason": "takeover (swap)"}
    swap, ssws = {"exit_code": 1, "message": "swap"}, {"exit_code": 2, "message": "SSWS"}
    daemon({"takeover": answers([swap, ssws]), "display": fixed(paired, calls)})
    assert pairctl(config, "takeover", "--wait") == 1  # horctakeover's code, once PAIR
    assert capsys.readouterr().out.splitlines()[-1] == "pair is PAIR"
    assert len(calls) == 1
    assert pairctl(config, "takeover", "--wait") == 2
    assert capsys.readouterr().out == "SSWS\n"
    assert len(calls) == 1  # an S-VOL takeover has no copy to follow
