"""State files: atomic replace with fsync of file and directory, bounded reads, wrapped errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from common import statefile
from common.statefile import StateFileError, read_bytes, read_json, write_json_atomic


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "pair.json"
    state = {"role": "primary", "state": "PAIR", "seq": 2**40, "volumes": ["vol0"]}
    write_json_atomic(path, state)
    assert read_json(path) == state
    write_json_atomic(path, {"state": "PSUS"})
    assert read_json(path) == {"state": "PSUS"}
    assert not (tmp_path / "pair.json.tmp").exists()
    assert path.stat().st_mode & 0o777 == 0o600


def test_missing_file_reads_as_none(tmp_path: Path) -> None:
    assert read_json(tmp_path / "absent.json") is None
    assert read_bytes(tmp_path / "absent.bin") is None


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b'{"state": "PA', "Unterminated string"),
        (b"", "Expecting value"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'["PAIR"]', "expected a JSON object, found list"),
        (b"null", "expected a JSON object, found NoneType"),
        (b'{"seq": ' + b"9" * 5000 + b"}", "digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_corrupt_file_is_a_state_file_error_naming_it(
    tmp_path: Path, content: bytes, detail: str
) -> None:
    path = tmp_path / "pair.json"
    path.write_bytes(content)
    with pytest.raises(StateFileError, match=detail) as info:
        read_json(path)
    assert str(info.value).startswith(f"parse state file {path}: ")


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "pair.json"
    path.write_bytes(b" " * 1000 + b"{}")
    with pytest.raises(StateFileError, match=f"read state file {path}: larger than 100 bytes"):
        read_json(path, max_bytes=100)
    assert read_json(path, max_bytes=1002) == {}


def test_unreadable_path_is_wrapped(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match=f"read state file {tmp_path}: Is a directory"):
        read_json(tmp_path)


def test_leftover_tmp_from_a_crash_is_ignored_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "pair.json"
    tmp = tmp_path / "pair.json.tmp"
    tmp.write_bytes(b'{"state": "half-writ')  # a crash between write and rename
    assert read_json(path) is None
    write_json_atomic(path, {"state": "COPY"})
    tmp.write_bytes(b"garbage")
    assert read_json(path) == {"state": "COPY"}
    write_json_atomic(path, {"state": "PAIR"})
    assert read_json(path) == {"state": "PAIR"}
    assert not tmp.exists()


def test_file_then_directory_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, bytes | None]] = []
    real_fsync = os.fsync
    path = tmp_path / "pair.json"

    def recording_fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        content = Path(target).read_bytes() if Path(target).is_file() else None
        synced.append((target, content))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_json_atomic(path, {"state": "PAIR"})
    # The data is durable in the tmp file before the rename, and the rename before returning.
    assert [target for target, _ in synced] == [f"{path}.tmp", str(tmp_path)]
    assert synced[0][1] == path.read_bytes()


def test_disk_full_is_wrapped_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pair.json"
    write_json_atomic(path, {"state": "PAIR"})

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StateFileError) as info:
        write_json_atomic(path, {"state": "PSUS"})
    assert str(info.value) == f"write state file {path}.tmp: No space left on device"
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert read_json(path) == {"state": "PAIR"}
    assert not (tmp_path / "pair.json.tmp").exists()


def test_fsync_failure_is_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    eio = "Input/output error"
    with pytest.raises(StateFileError, match=rf"fsync state file .*pair\.json\.tmp: {eio}"):
        write_json_atomic(tmp_path / "pair.json", {"state": "PAIR"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StateFileError, match=f"fsync directory {tmp_path}: {eio}"):
        statefile.fsync_directory(tmp_path)


def test_missing_directory_and_rename_failures_are_wrapped(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "pair.json"
    with pytest.raises(StateFileError, match=f"create state file {missing}.tmp: No such file"):
        write_json_atomic(missing, {})
    occupied = tmp_path / "occupied"
    (occupied / "child").mkdir(parents=True)
    with pytest.raises(StateFileError, match=f"rename state file {occupied}.tmp to {occupied}"):
        statefile.write_bytes_atomic(occupied, b"data")
    assert not (tmp_path / "occupied.tmp").exists()


def test_values_json_cannot_hold_are_the_callers_bug(tmp_path: Path) -> None:
    path = tmp_path / "pair.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"volumes": {"vol0"}})
    with pytest.raises(ValueError, match="Out of range float"):
        write_json_atomic(path, {"lag": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_write_bytes_atomic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    statefile.write_bytes_atomic(path, memoryview(b"\x00\x01" * 70_000))
    assert read_bytes(path) == b"\x00\x01" * 70_000
