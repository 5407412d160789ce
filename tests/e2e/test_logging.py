"""The daemons' log as a collector reads it: every line one JSON object (log.format: json) or
one logfmt line, the transitions carrying their fields, and SIGUSR1 turning DEBUG on and off.

    primaryd + secondaryd (log.format json) ── create ── writes ── PAIR ── SIGTERM
        every line of both logs: json.loads -> time, level, logger, message
        the transition lines: group, role, state, old (SMPL -> COPY -> PAIR on each side)
    primaryd (log.format logfmt) ── qemu-io: no DEBUG line ── SIGUSR1 ── qemu-io: DEBUG lines
        ── SIGUSR1 ── qemu-io: no new DEBUG line
"""

from __future__ import annotations

import json
import re
import signal
from typing import Any

import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    create_pair,
    display,
    qemu_io,
    wait_caught_up,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

LOGFMT_RE = re.compile(
    r"time=\S+ level=(debug|info|warning|error|critical) prog=primaryd "
    r"logger=\S+ msg=(\S+|\"([^\"\\]|\\.)*\")( [a-z_]+=(\S+|\"([^\"\\]|\\.)*\"))*"
)


def json_lines(daemon: Daemon) -> list[dict[str, Any]]:
    lines = daemon.log_text().splitlines()
    assert lines, f"{daemon.name} logged nothing"
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"{daemon.name} log line {number} is not JSON: {line!r}") from None
        assert isinstance(obj, dict), line
        assert {"time", "level", "logger", "message"} <= obj.keys(), line
        parsed.append(obj)
    return parsed


def test_a_json_log_is_one_object_per_line_and_transitions_carry_their_fields(
    daemons: Daemons,
) -> None:
    log = {"format": "json"}
    primary = daemons.prepare("primary", log=log)
    primary.start()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port, log=log)
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x5a 0 1M")
    wait_caught_up(primary)
    primary.stop()
    secondary.stop()
    for site, role in ((primary, "primary"), (secondary, "secondary")):
        lines = json_lines(site)
        steps = [
            (line["old"], line["state"])
            for line in lines
            if line.get("event") == "transition" and line["group"] == "jg0" and line["role"] == role
        ]
        assert steps[:2] == [("SMPL", "COPY"), ("COPY", "PAIR")], (site.name, steps)
        assert any(line["message"] == "stopped" for line in lines), site.name
    link = [line for line in json_lines(primary) if line["message"].startswith("secondary ")]
    assert link and all("peer" in line for line in link), link


def debug_lines(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log_text().splitlines() if " level=debug " in line]


def test_sigusr1_turns_debug_on_and_off_at_run_time(daemons: Daemons) -> None:
    primary = daemons.prepare("primary", log={"format": "logfmt", "level": "info"})
    primary.start()
    qemu_io(primary.uri(), "read 0 4k")  # an export chosen: a DEBUG line, when DEBUG is on
    assert debug_lines(primary) == []

    primary.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
    wait_until(lambda: "log level DEBUG" in primary.log_text(), 10, "the level change line")
    qemu_io(primary.uri(), "read 0 4k")
    wait_until(lambda: debug_lines(primary), 10, "DEBUG lines")
    assert any("uses export vol0" in line for line in debug_lines(primary))

    primary.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
    wait_until(lambda: "log level INFO again" in primary.log_text(), 10, "the level back")
    before = len(debug_lines(primary))
    qemu_io(primary.uri(), "read 0 4k")  # logged (or not) before qemu-io got its export
    assert len(debug_lines(primary)) == before
    for line in primary.log_text().splitlines():
        assert LOGFMT_RE.fullmatch(line), f"not a logfmt line: {line!r}"
