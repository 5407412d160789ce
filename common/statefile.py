"""Small state files written so that a crash leaves the old version or the new one, never a mix.

    write_bytes_atomic(path, data)
        │ open path.tmp (O_TRUNC) ── write all ── fsync ── close
        │ rename path.tmp over path          (atomic on POSIX file systems)
        └ fsync the directory                (makes the rename itself durable)

This is the "persist, then act" half of invariant 6: a caller acts on a new state only after
`write_json_atomic` returned. A leftover `path.tmp` from a crash is never read and is
overwritten by the next write.

Every failure is one StateFileError whose message starts with a verb phrase and the file
("write state file /x/y: No space left on device"); no OSError escapes raw. Reads are bounded
(`max_bytes`) so a huge or hostile file cannot exhaust memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "STATE_FILE_BYTES_MAX",
    "StateFileError",
    "fsync_directory",
    "read_bytes",
    "read_json",
    "write_bytes_atomic",
    "write_json_atomic",
]

# Pair state, roles, positions: a few hundred bytes. A larger JSON state file is not ours.
STATE_FILE_BYTES_MAX = 16 << 20


class StateFileError(Exception):
    """A state file that cannot be written, read or parsed; the message names the file."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_bytes_atomic(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Replace `path` with `data` durably: the file holds the old or the new bytes after a crash."""
    tmp = _tmp_path(path)
    step = f"create state file {tmp}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            step = f"write state file {tmp}"
            _write_all(fd, data)
            step = f"fsync state file {tmp}"
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        step = f"close state file {tmp}"
        os.close(fd)
        step = f"rename state file {tmp} to {path}"
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise StateFileError(f"{step}: {exc.strerror or exc}") from exc
    fsync_directory(path.parent)


def write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    """Write `obj` as a JSON object, atomically and durably (see `write_bytes_atomic`).

    A value JSON cannot hold (a set, NaN) raises TypeError/ValueError: that is the caller's bug,
    not a disk problem, and nothing is written.
    """
    text = json.dumps(dict(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode())


def fsync_directory(directory: Path) -> None:
    """Make renames and creations inside `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StateFileError(f"open directory {directory}: {exc.strerror}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StateFileError(f"fsync directory {directory}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read_bytes(path: Path, max_bytes: int = STATE_FILE_BYTES_MAX) -> bytes | None:
    """The content of `path`, or None when it does not exist.

    More than `max_bytes` is a StateFileError: the file is not one we wrote.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"read state file {path}: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise StateFileError(f"read state file {path}: larger than {max_bytes} bytes")
    return data


def read_json(path: Path, max_bytes: int = STATE_FILE_BYTES_MAX) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file does not exist."""
    data = read_bytes(path, max_bytes)
    if data is None:
        return None
    try:
        obj = json.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise StateFileError(f"parse state file {path}: not UTF-8 ({exc.reason})") from exc
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python's digit limit
        raise StateFileError(f"parse state file {path}: {exc}") from exc
    except RecursionError as exc:  # "[[[[..." nested deeper than the parser's recursion limit
        raise StateFileError(f"parse state file {path}: nested too deeply") from exc
    if not isinstance(obj, dict):
        raise StateFileError(
            f"parse state file {path}: expected a JSON object, found {type(obj).__name__}"
        )
    return obj


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    # Best effort: a leftover .tmp is harmless (never read, overwritten by the next write).
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
