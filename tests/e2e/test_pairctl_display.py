"""pairctl's text for operators against real daemons: display in COPY and PAIR, create --wait
as plain lines, display --watch in a pseudo-terminal.

    primaryd ◄── FaultProxy (throttled: the copy lasts a few seconds) ◄── secondaryd
       │ vol0 filled by qemu-io, then `pairctl create` ─► COPY ─► (throttle lifted) PAIR
       └ pairctl display (text), create --wait (stdout a pipe), display --watch (a pty)
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time

import pytest

from common.displaytext import human_size
from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import (
    DAEMON_BIN_DIR,
    Daemon,
    Daemons,
    MiB,
    display,
    pair_through_proxy,
    pairctl,
    qemu_io,
    wait_state,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

FILL = 16 * MiB
THROTTLE = 4 * MiB  # bytes/s: the copy of FILL lasts about 4 s
VOLUMES = (("vol0", 32 * MiB),)
PAIR_TIMEOUT_S = 60.0


def copying_pair(daemons: Daemons, proxies: list[FaultProxy]) -> tuple[Daemon, Daemon, FaultProxy]:
    """A pair whose secondary pulls through a throttled proxy, vol0 holding FILL bytes."""
    primary, secondary, proxy = pair_through_proxy(daemons, proxies, VOLUMES, pair={}, create=False)
    qemu_io(primary.uri(), f"write -P 0x5a 0 {FILL}")
    proxy.set_throttle(THROTTLE)
    return primary, secondary, proxy


def rows(text: str) -> dict[str, str]:
    """The indented key/value rows of a display text, keyed by the row's name."""
    found = {}
    for line in text.splitlines():
        if line.startswith("  "):
            key, _, value = line.strip().partition("  ")
            found[key] = value.strip()
    return found


def test_display_text_in_copy_then_pair(daemons: Daemons, proxied: list[FaultProxy]) -> None:
    primary, secondary, proxy = copying_pair(daemons, proxied)
    pairctl(primary, "create")

    def rate_measured() -> bool:
        copy = display(primary).get("copy") or {}
        return copy.get("rate_bytes_per_s") is not None and copy.get("done_bytes", 0) > 0

    wait_until(rate_measured, 15, "a copy rate on the primary", interval_s=0.1)
    text = pairctl(primary, "display").stdout
    assert text.splitlines()[0] == "jg0  primary  COPY"
    shown = rows(text)
    total = human_size(VOLUMES[0][1])
    applied = rf"(\d+\.\d)% applied \(.+ of {total}\)"
    copy = re.fullmatch(rf"{applied}, \d+\.\d% sent, .+/s, ETA .+", shown["copy"])
    assert copy is not None, text
    assert 0 < float(copy.group(1)) < 100
    assert re.fullmatch(r"COPY, restored \d+, applied \d+, heard .+ ago", shown["secondary"]), text
    assert shown["link"].startswith("up for ")

    seen_there = pairctl(secondary, "display").stdout
    assert seen_there.splitlines()[0] == "jg0  secondary  COPY"
    assert re.fullmatch(r"last seq \d+, heard .+ ago", rows(seen_there)["primary"]), seen_there
    assert f"of {total})" in rows(seen_there)["copy"]

    proxy.set_throttle(None)
    wait_state(primary, "PAIR", PAIR_TIMEOUT_S)
    wait_state(secondary, "PAIR", PAIR_TIMEOUT_S)
    wait_until(lambda: display(primary)["lag"]["entries"] == 0, 15, "lag 0")
    text = pairctl(primary, "display").stdout
    assert text.splitlines()[0] == "jg0  primary  PAIR"
    shown = rows(text)
    assert "copy" not in shown
    assert shown["lag"] == "0 entries, 0 B, 0.0 s"
    assert shown["secondary"].startswith("PAIR, restored ")
    assert re.search(r"^vol0 +32\.0 MiB  /", text, re.MULTILINE), text


def test_create_wait_prints_plain_lines_until_pair(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    primary, secondary, _ = copying_pair(daemons, proxied)
    proc = pairctl(primary, "create", "--wait", timeout=PAIR_TIMEOUT_S)
    lines = proc.stdout.splitlines()
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout  # not a terminal: no redraws
    assert lines[0] == "pair jg0: COPY started"
    assert lines[-1] == "pair is PAIR"
    progress = [re.match(r"pair jg0: primary COPY (\d+)\.\d% ", line) for line in lines[1:-1]]
    percents = [int(m.group(1)) for m in progress if m is not None]
    assert len(percents) >= 2, proc.stdout  # a copy of about 4 s, polled twice a second
    assert percents == sorted(percents) and len(set(percents)) == len(percents), proc.stdout
    assert display(primary)["state"] == "PAIR"
    wait_state(secondary, "PAIR", PAIR_TIMEOUT_S)


def read_pty(fd: int, until_s: float) -> bytes:
    """Everything the pty's other end wrote until `until_s` (monotonic) or its EOF."""
    data = b""
    while (left_s := until_s - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left_s)
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        data += chunk
    return data


def test_display_watch_redraws_in_place_in_a_terminal(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    primary, _, _ = pair_through_proxy(daemons, proxied, VOLUMES, pair={}, create=False)
    controller, terminal = pty.openpty()
    argv = [DAEMON_BIN_DIR / "pairctl", "--config", primary.config_path]
    proc = subprocess.Popen(
        [*argv, "display", "--watch", "0.2"], stdin=terminal, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    try:
        shown = b""
        deadline = time.monotonic() + 15
        while shown.count(b"jg0  primary  SMPL") < 3 and time.monotonic() < deadline:
            shown += read_pty(controller, time.monotonic() + 0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        shown += read_pty(controller, time.monotonic() + 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    frames = shown.count(b"jg0  primary  SMPL")
    assert frames >= 3, shown
    # The first frame clears the screen; every later one starts at the top left (no scroll)
    # and clears what it does not overwrite. The cursor is shown again at the end.
    assert shown.count(b"\x1b[H\x1b[2J") == 1, shown
    assert shown.count(b"\x1b[H") == frames, shown
    assert shown.count(b"\x1b[J") == frames, shown
    assert shown.startswith(b"\x1b[?25l") and shown.rstrip().endswith(b"\x1b[?25h"), shown
