"""The control API over real Unix sockets: round trips, refusals, bad clients, lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from common.control import (
    REQUEST_BYTES_MAX,
    ControlError,
    ControlRefused,
    ControlServer,
    call,
    private_unix_socket,
    stream,
)
from common.pairstate import PairInput, PairState, Role, next_state


async def echo(args: Mapping[str, Any]) -> Mapping[str, Any]:
    return {"echo": dict(args), "path": Path("/x/vol0.img")}


async def refuse(args: Mapping[str, Any]) -> Mapping[str, Any]:
    raise ControlRefused("cannot resync: pair is PAIR", exit_code=4)


async def table_says_no(args: Mapping[str, Any]) -> Mapping[str, Any]:
    next_state(Role.PRIMARY, PairState.PAIR, PairInput.RESYNC)  # raises Refused
    return {}


async def crash(args: Mapping[str, Any]) -> Mapping[str, Any]:
    raise KeyError("journal")


HANDLERS = {"echo": echo, "refuse": refuse, "crash": crash, "resync": table_says_no}


async def started(path: Path, **kwargs: Any) -> ControlServer:
    server = ControlServer(path, HANDLERS, **kwargs)
    await server.start()
    return server


async def raw_exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, read every answer line until the server closes."""
    reader, writer = await asyncio.open_unix_connection(os.fspath(path))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return [json.loads(line) for line in answer.splitlines()]


@pytest.mark.asyncio
async def test_round_trip_creates_a_private_socket_and_stop_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ctl.sock"
    server = await started(path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        result = await call(path, "echo", {"rw": True, "n": [1, 2]})
        assert result == {"echo": {"rw": True, "n": [1, 2]}, "path": "/x/vol0.img"}
        assert await call(path, "echo") == {"echo": {}, "path": "/x/vol0.img"}
    finally:
        await server.stop()
    assert not path.exists()
    await server.stop()  # idempotent


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore this process's umask after a test that sets its own."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_the_socket_file_is_born_owner_only_even_with_umask_0(tmp_path: Path, umask: None) -> None:
    """No moment with a wider mode: the file is 0600 the instant bind() makes it."""
    os.umask(0)
    path = tmp_path / "ctl.sock"
    with private_unix_socket() as sock:
        sock.bind(os.fspath(path))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.asyncio
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o277, 0o777])
async def test_the_socket_is_0600_whatever_the_umask(
    tmp_path: Path, umask: None, mask: int
) -> None:
    """A umask may take bits from the owner too (0277: read-only); the owner gets them back."""
    os.umask(mask)
    path = tmp_path / "ctl.sock"
    server = await started(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_uid == os.geteuid()
        assert (await call(path, "echo"))["echo"] == {}
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_a_socket_born_wider_than_0600_is_removed_not_served(
    tmp_path: Path, umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that ignored the mode set before bind (not Linux): refuse to start."""
    os.umask(0o022)
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: None)
    path = tmp_path / "ctl.sock"
    server = ControlServer(path, HANDLERS)
    with pytest.raises(ControlError, match="created with mode 0755, not 0600"):
        await server.start()
    assert not path.exists()


@pytest.mark.asyncio
async def test_a_refusal_of_the_state_table_is_a_refusal_not_an_internal_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ctl.sock"
    server = await started(path)
    try:
        with pytest.raises(ControlRefused) as info:
            await call(path, "resync")
        assert info.value.reason == "cannot resync: pair is PAIR"
        assert info.value.exit_code == 1
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_refusal_carries_reason_and_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = await started(path)
    try:
        with pytest.raises(ControlRefused) as info:
            await call(path, "refuse")
        assert info.value.reason == "cannot resync: pair is PAIR"
        assert info.value.exit_code == 4
        lines = await raw_exchange(path, b'{"verb": "refuse", "args": {}}\n')
        assert lines == [
            {"ok": False, "error": "cannot resync: pair is PAIR", "exit_code": 4},
        ]
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_unknown_verb_is_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = await started(path)
    try:
        with pytest.raises(ControlRefused) as info:
            await call(path, "frobnicate")
        assert (info.value.reason, info.value.exit_code) == ("unknown verb frobnicate", 2)
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_handler_crash_is_logged_and_the_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ctl.sock"
    server = await started(path)
    try:
        with (
            caplog.at_level(logging.ERROR, logger="journalpair.control"),
            pytest.raises(ControlRefused) as info,
        ):
            await call(path, "crash")
        assert info.value.exit_code == 70
        assert info.value.reason == "internal error: KeyError: 'journal'"
        [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert record.exc_info is not None and record.exc_info[0] is KeyError
        assert await call(path, "echo", {"after": 1}) == {
            "echo": {"after": 1},
            "path": "/x/vol0.img",
        }
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_oversize_request_line_is_refused_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = await started(path)
    try:
        padding = "x" * (REQUEST_BYTES_MAX + 10)
        line = json.dumps({"verb": "echo", "args": {"pad": padding}}).encode() + b"\n"
        [answer] = await raw_exchange(path, line)
        assert answer["ok"] is False
        assert answer["exit_code"] == 2
        assert f"longer than {REQUEST_BYTES_MAX} bytes" in answer["error"]
        # Just under the limit is fine.
        pad = "x" * (REQUEST_BYTES_MAX - 100)
        assert (await call(path, "echo", {"pad": pad}))["echo"] == {"pad": pad}
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("request_line", "why"),
    [
        (b"not json\n", "request is not JSON"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"args": {}}\n', '"verb" must be a non-empty string'),
        (b'{"verb": "echo", "args": [1]}\n', '"args" must be a JSON object'),
        (b'{"verb": "echo", "extra": 1}\n', "unknown request keys: extra"),
        (b"", "no request line before end of stream"),
    ],
)
@pytest.mark.asyncio
async def test_bad_request_gets_one_error_line_then_close(
    tmp_path: Path, request_line: bytes, why: str
) -> None:
    path = tmp_path / "ctl.sock"
    server = await started(path)
    try:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        writer.write(request_line)
        writer.write_eof()
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        [line] = answer.splitlines()
        reply = json.loads(line)
        assert reply["ok"] is False and reply["exit_code"] == 2
        assert reply["error"].startswith("bad request: ")
        assert why in reply["error"]
        assert (await call(path, "echo"))["echo"] == {}
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_silent_client_times_out(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = await started(path, request_timeout_s=0.2)
    try:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert json.loads(answer)["error"] == "bad request: no request line within 0.2 s"
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_stale_socket_is_removed_on_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ctl.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))  # what a SIGKILLed daemon leaves behind
    dead.close()
    with pytest.raises(ControlError, match="Connection refused"):
        await call(path, "echo")
    with caplog.at_level(logging.INFO, logger="journalpair.control"):
        server = await started(path)
    try:
        assert any("removing stale control socket" in r.getMessage() for r in caplog.records)
        assert (await call(path, "echo"))["echo"] == {}
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    first = await started(path)
    try:
        second = ControlServer(path, HANDLERS)
        with pytest.raises(ControlError, match=f"another daemon is already listening on {path}"):
            await second.start()
        await second.stop()  # never started: nothing to do, and the first one's socket stays
        assert (await call(path, "echo"))["echo"] == {}
    finally:
        await first.stop()


@pytest.mark.asyncio
async def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await started(path)
    assert path.read_text() == "precious"


@pytest.mark.asyncio
async def test_call_when_nothing_listens_says_so(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(ControlError) as info:
        await call(path, "display")
    assert str(info.value) == (
        f"cannot reach the daemon at {path}: No such file or directory (is it running?)"
    )


@pytest.mark.asyncio
async def test_stream_delivers_events_and_ends_when_the_client_leaves(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    feed: asyncio.Queue[int] = asyncio.Queue()
    closed = asyncio.Event()
    seen_args: list[Mapping[str, Any]] = []

    async def follow(args: Mapping[str, Any]) -> AsyncIterator[Mapping[str, Any]]:
        seen_args.append(args)
        try:
            while True:
                yield {"n": await feed.get()}
        finally:
            closed.set()

    server = ControlServer(path, HANDLERS, {"events": follow})
    await server.start()
    try:
        for n in range(3):
            feed.put_nowait(n)
        events = stream(path, "events", {"follow": True})
        got = [await anext(events) for _ in range(3)]
        assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert seen_args == [{"follow": True}]
        await events.aclose()
        # No further event is produced: only the EOF tells the server the client left.
        async with asyncio.timeout(5):
            await closed.wait()
            while server.connections:
                await asyncio.sleep(0.01)
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_stream_ends_when_the_generator_ends_and_reports_its_refusal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ctl.sock"

    async def two(args: Mapping[str, Any]) -> AsyncIterator[Mapping[str, Any]]:
        yield {"n": 1}
        yield {"n": 2}

    async def refused(args: Mapping[str, Any]) -> AsyncIterator[Mapping[str, Any]]:
        yield {"n": 1}
        raise ControlRefused("events are off", exit_code=5)

    server = ControlServer(path, HANDLERS, {"two": two, "refused": refused})
    await server.start()
    try:
        assert [e async for e in stream(path, "two")] == [{"n": 1}, {"n": 2}]
        got: list[Mapping[str, Any]] = []
        with pytest.raises(ControlRefused) as info:
            async for event in stream(path, "refused"):
                got.append(event)
        assert got == [{"n": 1}]
        assert (info.value.reason, info.value.exit_code) == ("events are off", 5)
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_a_verb_with_both_handlers_streams_only_when_following(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"

    async def history(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"events": [{"n": 0}]}

    async def follow(args: Mapping[str, Any]) -> AsyncIterator[Mapping[str, Any]]:
        yield {"n": 1}

    server = ControlServer(path, {"events": history}, {"events": follow})
    await server.start()
    try:
        assert await call(path, "events", {"follow": False}) == {"events": [{"n": 0}]}
        assert await call(path, "events") == {"events": [{"n": 0}]}
        assert [e async for e in stream(path, "events", {"follow": True})] == [{"n": 1}]
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_stop_cancels_a_call_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(args: Mapping[str, Any]) -> Mapping[str, Any]:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    server = ControlServer(path, {"hang": hang})
    await server.start()
    pending = asyncio.create_task(call(path, "hang"))
    async with asyncio.timeout(5):
        await entered.wait()
        await server.stop()
        with pytest.raises(ControlError, match="closed the connection without answering"):
            await pending
    assert cancelled.is_set()
    assert server.connections == 0
    assert not path.exists()


@pytest.mark.asyncio
async def test_call_timeout(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"

    async def slow(args: Mapping[str, Any]) -> Mapping[str, Any]:
        await asyncio.sleep(3600)
        return {}

    server = ControlServer(path, {"slow": slow})
    await server.start()
    try:
        with pytest.raises(ControlError, match=r"no answer from the daemon at .* within 0.2 s"):
            await call(path, "slow", timeout_s=0.2)
    finally:
        await server.stop()
