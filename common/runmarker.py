"""Was the last stop clean, and did the machine itself go down?

    start: marker exists? ── no ──► clean (or first) start
                 │ yes: the daemon was killed, or the machine crashed
                 ├── same boot id ──► process crash: the page cache survived
                 └── other boot id ──► system crash / power loss: whatever was not
                                       fdatasync'ed may be gone, in any order
           then (re)write the marker with this boot's id, fsync'ed
    clean stop: remove the marker

The boot id is the kernel's random id for this boot (/proc/sys/kernel/random/boot_id).
"""

from __future__ import annotations

import enum
from pathlib import Path

from common.statefile import StateFileError, fsync_directory, read_bytes, write_bytes_atomic

FILE_NAME = "running"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


class LastStop(enum.Enum):
    CLEAN = "clean"
    PROCESS_CRASH = "process crash"  # SIGKILL, OOM, a bug: the page cache is intact
    SYSTEM_CRASH = "system crash"  # power loss, kernel panic: only what was synced is


def boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


def mark_running(data_dir: Path) -> LastStop:
    """Call once at start: how the last run ended, then mark this one as running."""
    path = data_dir / FILE_NAME
    try:
        previous = read_bytes(path, max_bytes=4096)
    except StateFileError:
        previous = b"?"
    if previous is None:
        last = LastStop.CLEAN
    elif previous.decode(errors="replace").strip() == boot_id():
        last = LastStop.PROCESS_CRASH
    else:
        last = LastStop.SYSTEM_CRASH
    write_bytes_atomic(path, boot_id().encode() + b"\n")
    return last


def mark_stopped(data_dir: Path) -> None:
    """Call last at a clean stop, after everything is synced."""
    (data_dir / FILE_NAME).unlink(missing_ok=True)
    fsync_directory(data_dir)
