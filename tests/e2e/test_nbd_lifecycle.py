"""Daemon lifecycle seen from outside: SIGTERM under load, and configs that are refused."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbd
import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    MiB,
    Volume,
    close_handle,
    config_text,
    free_port,
    read_at,
    run_daemon_to_exit,
    sha256_file,
    wait_command,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

EXIT_TIMEOUT_S = 5.0


def drive_until_settled(
    handle: nbd.NBD, cookies: dict[int, int], timeout_s: float
) -> tuple[set[int], set[int]]:
    """Poll until every command succeeded or failed; a hang fails. Returns (ok, failed)."""
    ok: set[int] = set()
    failed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(ok) + len(failed) < len(cookies):
        for cookie in cookies.keys() - ok - failed:
            try:
                if handle.aio_command_completed(cookie):
                    ok.add(cookie)
            except nbd.Error:
                failed.add(cookie)  # an error reply, or retired when the connection closed
        if len(ok) + len(failed) == len(cookies):
            break
        if time.monotonic() > deadline:
            pending = len(cookies) - len(ok) - len(failed)
            raise AssertionError(f"client hung: {pending} requests neither answered nor failed")
        try:
            handle.poll(100)
        except nbd.Error:
            time.sleep(0.01)  # connection gone: libnbd retires what was pending
    return ok, failed


def test_sigterm_with_in_flight_writes_answers_or_disconnects_and_exits_zero(
    primary: Daemon,
) -> None:
    handle = nbd.NBD()
    handle.connect_uri(primary.uri())
    cookies: dict[int, int] = {}
    for index in range(48):
        buf = nbd.Buffer.from_bytearray(bytearray([index + 1]) * MiB)
        cookies[handle.aio_pwrite(buf, index * MiB)] = index
    assert handle.aio_in_flight() > 0

    primary.terminate()
    ok, failed = drive_until_settled(handle, cookies, timeout_s=15)
    code = primary.wait(EXIT_TIMEOUT_S)
    close_handle(handle)

    assert code == 0, f"exit code {code} after SIGTERM\n{primary.log_tail()}"
    # Every write the server acknowledged is in the volume file after the graceful stop.
    lost = [
        cookies[c]
        for c in ok
        if read_at(primary.volume().path, cookies[c] * MiB, MiB) != bytes([cookies[c] + 1]) * MiB
    ]
    assert not lost, f"acknowledged writes missing after SIGTERM: {sorted(lost)}"
    print(f"{len(ok)} writes answered, {len(failed)} failed or cut off by the stop")


def test_sigterm_with_idle_connected_client_exits_zero_promptly(primary: Daemon) -> None:
    handle = nbd.NBD()
    handle.connect_uri(primary.uri())
    handle.pwrite(b"\x01" * 4096, 0)

    started = time.monotonic()
    primary.terminate()
    code = primary.wait(EXIT_TIMEOUT_S)

    assert code == 0, primary.log_tail()
    assert time.monotonic() - started < EXIT_TIMEOUT_S
    # The client sees the connection closed, not a hang.
    with pytest.raises(nbd.Error):
        wait_command(handle, handle.aio_pread(nbd.Buffer(4096), 0), timeout_s=5)
    close_handle(handle)


def test_sigterm_then_restart_serves_the_same_data(daemons: Daemons) -> None:
    primary = daemons.start_primary()
    handle = nbd.NBD()
    handle.connect_uri(primary.uri())
    handle.pwrite(b"\x6b" * MiB, 2 * MiB)
    close_handle(handle)
    primary.stop()

    primary.start()
    handle = nbd.NBD()
    handle.connect_uri(primary.uri())
    assert handle.pread(MiB, 2 * MiB) == b"\x6b" * MiB
    close_handle(handle)


# --- refused configs --------------------------------------------------------------------------


def base_config(tmp_path: Path, volume_path: Path, role: str = "primary") -> str:
    return config_text(
        role=role,
        data_dir=tmp_path / "data",
        nbd_port=free_port(),
        peer_port=free_port(),
        control=tmp_path / "ctl.sock",
        volumes=[Volume("vol0", 64 * MiB, volume_path)],
    )


def edit(text: str, pattern: str, replacement: str) -> str:
    edited, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert count == 1, (pattern, text)
    return edited


def assert_refused(role: str, config_path: Path, *names: str) -> str:
    result = run_daemon_to_exit(role, config_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit code {result.returncode}, stderr:\n{result.stderr}"
    assert len(lines) == 1, f"want one line on stderr, got:\n{result.stderr}"
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


# case -> (regex over the good config, replacement, what the error line must name)
BAD_CONFIGS = {
    "unknown-top-level-key": (r"^group: jg0$", "group: jg0\ncolour: blue", ["colour"]),
    "unknown-volume-key": (r"size: (\d+)\}", r"size: \1, sise: 1}", ["sise"]),
    "missing-key": (r"^group: jg0\n", "", ["group"]),
    "bad-size": (r"capacity: 64MiB", "capacity: 64XB", ["journal.capacity"]),
    "bad-address": (r"^  nbd: .*$", "  nbd: localhost-no-port", ["listen.nbd"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_config_error_exits_2_naming_the_key_and_creates_nothing(
    tmp_path: Path, case: str, role: str
) -> None:
    old, new, names = BAD_CONFIGS[case]
    volume_path = tmp_path / "vol0.img"
    config = tmp_path / "bad.yaml"
    config.write_text(edit(base_config(tmp_path, volume_path, role), old, new))

    assert_refused(role, config, *names)
    assert not volume_path.exists(), "volume file created despite the config error"
    assert not (tmp_path / "data").exists(), "data_dir created despite the config error"


def test_existing_volume_file_of_another_size_is_refused_and_left_alone(tmp_path: Path) -> None:
    volume_path = tmp_path / "vol0.img"
    volume_path.write_bytes(b"\xa5" * MiB)  # config says 64 MiB
    before = (sha256_file(volume_path), os.stat(volume_path).st_mtime_ns)
    config = tmp_path / "primary.yaml"
    config.write_text(base_config(tmp_path, volume_path))

    assert_refused("primary", config, str(volume_path))
    assert volume_path.stat().st_size == MiB, "volume file truncated or extended"
    assert (sha256_file(volume_path), os.stat(volume_path).st_mtime_ns) == before
