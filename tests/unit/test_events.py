"""The transition event log: file lines, rotation, history, and followers that fall behind."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from common.events import EventLog

TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def make_log(tmp_path: Path, **kwargs: Any) -> EventLog:
    roles = iter(["primary", "primary", "secondary"] * 100)
    return EventLog(tmp_path / "events.log", "jg0", lambda: next(roles), **kwargs)


def test_emit_appends_one_json_line_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = make_log(tmp_path)
    with caplog.at_level(logging.INFO, logger="journalpair.events"):
        event = events.emit("PAIR", "PSUS", "split by operator", seq=42)
    assert TIME_RE.fullmatch(event.pop("time"))
    assert event == {
        "group": "jg0",
        "role": "primary",
        "kind": "transition",
        "old": "PAIR",
        "new": "PSUS",
        "reason": "split by operator",
        "seq": 42,
    }
    [line] = (tmp_path / "events.log").read_text().splitlines()
    written = json.loads(line)
    assert list(written) == ["time", "group", "role", "kind", "old", "new", "reason", "seq"]
    [record] = caplog.records
    assert record.getMessage() == "PAIR -> PSUS: split by operator"
    fields = {k: getattr(record, k) for k in ("group", "role", "state", "old", "event")}
    assert fields == {
        "group": "jg0",
        "role": "primary",
        "state": "PSUS",
        "old": "PAIR",
        "event": "transition",
    }


def test_a_notice_is_an_event_in_the_current_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = make_log(tmp_path)
    heard: list[dict[str, Any]] = []
    events.add_listener(heard.append)
    with caplog.at_level(logging.INFO, logger="journalpair.events"):
        event = events.notice(
            "rpo_exceeded", "PAIR", "lag 3.0 s over 2 s", level=logging.WARNING, lag_s=3.0
        )
    assert (event["kind"], event["old"], event["new"], event["lag_s"]) == (
        "rpo_exceeded",
        "PAIR",
        "PAIR",
        3.0,
    )
    assert heard == [event]
    assert events.history() == [event]
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "rpo_exceeded in PAIR: lag 3.0 s over 2 s"
    assert (record.event, record.state, record.group) == ("rpo_exceeded", "PAIR", "jg0")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="emit"):
        events.notice("transition", "PAIR", "x")


def test_role_is_asked_at_each_emit(tmp_path: Path) -> None:
    events = make_log(tmp_path)
    roles = [events.emit("PAIR", "PAIR", f"n{n}")["role"] for n in range(3)]
    assert roles == ["primary", "primary", "secondary"]


def test_reserved_keys_cannot_be_overridden(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved: group"):
        make_log(tmp_path).emit("PAIR", "PSUS", "x", group="other")


def test_history_is_oldest_first_and_limited(tmp_path: Path) -> None:
    events = make_log(tmp_path)
    for n in range(10):
        events.emit("COPY", "PAIR", f"r{n}")
    assert [e["reason"] for e in events.history()] == [f"r{n}" for n in range(10)]
    assert [e["reason"] for e in events.history(limit=3)] == ["r7", "r8", "r9"]
    assert events.history(limit=0) == []
    assert make_log(tmp_path / "nothing-yet").history() == []


def test_rotation_keeps_one_old_file_and_history_spans_both(tmp_path: Path) -> None:
    events = make_log(tmp_path, max_bytes=1000)
    for n in range(40):
        events.emit("PAIR", "PFUL", f"journal high {n:02}")
    current, old = tmp_path / "events.log", tmp_path / "events.log.1"
    assert old.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.log", "events.log.1"]
    assert current.stat().st_size <= 1000
    assert old.stat().st_size <= 1000
    reasons = [e["reason"] for e in events.history()]
    old_count = len(old.read_text().splitlines())
    assert len(reasons) == old_count + len(current.read_text().splitlines())
    assert len(reasons) < 40  # older files were dropped
    assert reasons == [f"journal high {n:02}" for n in range(40 - len(reasons), 40)]


def test_corrupt_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events = make_log(tmp_path)
    events.emit("SMPL", "COPY", "create")
    with (tmp_path / "events.log").open("ab") as f:
        f.write(b'{"torn": \n[1, 2]\n\xff\xfe\n\n')
    events.emit("COPY", "PAIR", "copy done")
    with (tmp_path / "events.log").open("ab") as f:
        f.write(b'{"time": "2024-')  # a torn last line
    with caplog.at_level(logging.WARNING, logger="journalpair.events"):
        assert [e["new"] for e in events.history()] == ["COPY", "PAIR"]
    assert "skipped 4 corrupt line(s)" in caplog.text


def test_write_failure_is_a_warning_not_an_exception(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = EventLog(tmp_path / "missing-dir" / "events.log", "jg0", lambda: "secondary")
    with caplog.at_level(logging.WARNING, logger="journalpair.events"):
        event = events.emit("PAIR", "PSUE", "link lost")
    assert event["new"] == "PSUE"
    assert "cannot append to event log" in caplog.text
    assert "No such file or directory" in caplog.text


@pytest.mark.asyncio
async def test_follow_delivers_new_events_and_unsubscribes_on_close(tmp_path: Path) -> None:
    events = make_log(tmp_path)
    events.emit("SMPL", "COPY", "before")
    feed = events.follow()
    first = asyncio.ensure_future(anext(feed))
    await asyncio.sleep(0)  # the generator runs up to its first wait: subscribed
    assert events.followers == 1
    events.emit("COPY", "PAIR", "copy done")
    events.emit("PAIR", "PFUL", "journal high")
    async with asyncio.timeout(5):
        assert (await first)["reason"] == "copy done"
        second = await anext(feed)
    assert second["reason"] == "journal high"
    assert "dropped" not in second
    await feed.aclose()
    assert events.followers == 0


@pytest.mark.asyncio
async def test_follow_with_backlog_starts_from_history(tmp_path: Path) -> None:
    events = make_log(tmp_path)
    for reason in ("a", "b", "c"):
        events.emit("PAIR", "PAIR", reason)
    feed = events.follow(backlog=2)
    async with asyncio.timeout(5):
        assert (await anext(feed))["reason"] == "b"
        events.emit("PAIR", "PAIR", "d")  # emitted while the backlog is being read
        assert (await anext(feed))["reason"] == "c"
        assert (await anext(feed))["reason"] == "d"
    await feed.aclose()


@pytest.mark.asyncio
async def test_slow_follower_loses_the_oldest_and_is_told_how_many(tmp_path: Path) -> None:
    events = make_log(tmp_path, queue_max=3)
    slow = events.follow()
    fast = events.follow()
    pending = [asyncio.ensure_future(anext(slow)), asyncio.ensure_future(anext(fast))]
    await asyncio.sleep(0)
    events.emit("SMPL", "COPY", "e0")  # taken at once by both waiting followers
    async with asyncio.timeout(5):
        assert [(await p)["reason"] for p in pending] == ["e0", "e0"]
        fast_seen = []
        for n in range(1, 8):
            events.emit("COPY", "COPY", f"e{n}")
            fast_seen.append((await anext(fast))["reason"])  # keeps up: loses nothing
        assert fast_seen == [f"e{n}" for n in range(1, 8)]
        # slow read nothing while e1..e7 arrived: its queue of 3 kept e5, e6, e7.
        got = [await anext(slow) for _ in range(3)]
    assert [e["reason"] for e in got] == ["e5", "e6", "e7"]
    assert got[0]["dropped"] == 4
    assert "dropped" not in got[1] and "dropped" not in got[2]
    events.emit("COPY", "PAIR", "e8")
    async with asyncio.timeout(5):
        assert "dropped" not in await anext(slow)
    await slow.aclose()
    await fast.aclose()
    assert events.followers == 0
    # The file has every event, whatever the followers lost.
    assert len(events.history()) == 9


def test_listeners_get_each_event_after_it_is_written(tmp_path: Path) -> None:
    events = make_log(tmp_path)
    seen: list[tuple[str, int]] = []

    def listener(event: dict[str, Any]) -> None:
        written = len((tmp_path / "events.log").read_text().splitlines())
        seen.append((event["reason"], written))

    events.add_listener(listener)
    for reason in ("a", "b", "c"):
        events.emit("PAIR", "PAIR", reason)
    assert seen == [("a", 1), ("b", 2), ("c", 3)]


def test_a_failing_listener_is_logged_and_does_not_fail_the_transition(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = make_log(tmp_path)
    after: list[str] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    events.add_listener(broken)
    events.add_listener(lambda event: after.append(event["new"]))
    with caplog.at_level(logging.ERROR, logger="journalpair.events"):
        event = events.emit("PAIR", "PSUE", "link lost")
    assert event["new"] == "PSUE"
    assert after == ["PSUE"]  # the next listener still ran
    assert "failed on PAIR -> PSUE" in caplog.text and "listener bug" in caplog.text
    assert [e["new"] for e in events.history()] == ["PSUE"]
