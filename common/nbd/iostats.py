"""What hosts asked of one export: requests, bytes and latency per kind of request.

Counted by the NBD server where requests are answered (common.nbd.server), only when
metrics are on (``metrics.listen``); read by the metrics collector at scrape time. The
latency of a request is from the moment the event loop received the bytes that completed
it to the moment its reply was made (after the volume I/O; after the fdatasync for FLUSH
and FUA): the daemon's own share of what a host sees, without the network. Requests
answered inline are counted a batch at a time (the batch's replies go out together, so
they share one latency): per request the hot path pays a tuple lookup and two additions,
the clock and the histogram are paid once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from common.metrics.histogram import LatencyHistogram
from common.nbd.constants import Cmd

__all__ = ["OPS", "HostIoStats"]

# The `op` label of the metrics; "other" is CACHE and BLOCK_STATUS (no data moves).
OPS = ("read", "write", "trim", "zero", "flush", "other")
_READ, _WRITE, _TRIM, _ZERO, _FLUSH, _OTHER = range(len(OPS))
# Indexed by the command number (NBD_CMD_*): a tuple lookup, no hashing on the hot path.
_OP_OF_CMD: tuple[int, ...] = tuple(
    {
        Cmd.READ: _READ,
        Cmd.WRITE: _WRITE,
        Cmd.TRIM: _TRIM,
        Cmd.WRITE_ZEROES: _ZERO,
        Cmd.FLUSH: _FLUSH,
    }.get(cmd, _OTHER)
    for cmd in Cmd
)
assert [int(cmd) for cmd in Cmd] == list(range(len(Cmd))), "Cmd values must be 0..n-1"


class Answered(Protocol):
    """What is counted of a request (common.nbd.protocol.Request has it)."""

    @property
    def cmd(self) -> Cmd: ...
    @property
    def length(self) -> int: ...


class HostIoStats:
    """Per op (OPS order): requests answered, bytes they asked for (read, written, trimmed
    or zeroed; 0 for a flush), and a latency histogram."""

    __slots__ = ("bytes", "latency", "requests")

    def __init__(self) -> None:
        self.requests = [0] * len(OPS)
        self.bytes = [0] * len(OPS)
        self.latency = [LatencyHistogram() for _ in OPS]

    def answered(self, requests: Iterable[Answered], elapsed_ns: int) -> None:
        """``requests`` were answered together, ``elapsed_ns`` after they arrived."""
        op_of, nbytes = _OP_OF_CMD, self.bytes
        counts = [0] * len(OPS)
        for req in requests:
            op = op_of[req.cmd]
            counts[op] += 1
            nbytes[op] += req.length
        for op, count in enumerate(counts):
            if count:
                self.requests[op] += count
                self.latency[op].observe_ns(elapsed_ns, count)
