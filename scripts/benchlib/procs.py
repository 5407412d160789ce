"""What a server process costs, from /proc: CPU seconds and peak resident memory.

CPU is utime + stime of the whole process (all its threads) from /proc/PID/stat, in clock
ticks. Peak RSS is VmHWM from /proc/PID/status; writing "5" to /proc/PID/clear_refs resets it
to the current RSS (Linux >= 4.0), so a peak can be taken per job rather than since start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20


class ProcError(RuntimeError):
    pass


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as e:
        raise ProcError(f"read /proc/{pid}/stat: {e.strerror} (did the process exit?)") from e
    # Fields after the command name, which is in parentheses and may hold spaces: state is
    # field 3, utime field 14 and stime field 15 (proc(5)), so indexes 11 and 12 here.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the peak resident set size since start or since reset_peak_rss()."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise ProcError(f"read /proc/{pid}/status: {e.strerror} (did the process exit?)") from e
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise ProcError(f"/proc/{pid}/status has no VmHWM")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS; False when not allowed (then the peak is since start)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Usage:
    """CPU and peak RSS of named processes over one window: start() ... cpu_since_start()."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.cpu_start: dict[str, float] = {}
        self.peak_reset = False

    def start(self) -> None:
        self.peak_reset = all([reset_peak_rss(pid) for pid in self.pids.values()])
        self.mark_cpu()

    def mark_cpu(self) -> None:
        """Start the CPU window now (e.g. at the end of fio's ramp time)."""
        self.cpu_start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def cpu_since_start(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self.cpu_start[name] for name, pid in self.pids.items()}

    def peak_rss_mib(self) -> dict[str, float]:
        return {name: peak_rss_bytes(pid) / MiB for name, pid in self.pids.items()}
