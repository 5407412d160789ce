"""Many NBD clients holding the daemon's memory at once, and what that costs it.

    read hogs: handshake, then a burst of 127 KiB READs never read back (each reply is made
               in memory and queued for a client that does not take it)
    write hogs: handshake, then a 32 MiB WRITE header and half its payload, and nothing more
               (the server buffers a WRITE's whole payload before it serves it)

Every hog sends from its own thread until the server stops taking bytes; meanwhile the
daemon's peak RSS is sampled and a well-behaved libnbd client times its own small I/O.
Used by tests/e2e/test_nbd_memory_limit.py and scripts/bench_nbd_memory.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import nbd

from tests.e2e.helpers import Daemon, KiB, MiB, close_handle
from tests.e2e.test_nbd_hostile import (
    PeakRss,
    TightClient,
    read_burst,
    send_until_refused,
)
from tests.e2e.test_nbd_raw_socket import CMD_WRITE

HOG_READS = 20_000  # ~2.4 GiB of replies asked for, by each read hog
HOG_WRITE_BYTES = 32 * MiB  # the largest payload the server takes (NBD_INFO_BLOCK_SIZE)
BYSTANDER_BYTES = 4 * KiB


@dataclass
class HogReport:
    rss_before: int
    rss_peak: int
    bystander_s: float  # the bystander's 4 KiB write + read + 1 MiB read, while hogs hold

    @property
    def grown(self) -> int:
        return self.rss_peak - self.rss_before


def write_hog_bytes(client: TightClient) -> bytes:
    header = client.request_header(CMD_WRITE, 0, HOG_WRITE_BYTES)
    return header + b"\xee" * (HOG_WRITE_BYTES // 2)


def open_hogs(port: int, count: int) -> list[TightClient]:
    hogs = []
    for _ in range(count):
        hog = TightClient(port)
        hog.handshake()
        hogs.append(hog)
    return hogs


def bystander_io(uri: str) -> float:
    """Seconds a fresh well-behaved client takes for a small write, a read back and a 1 MiB
    read (the last one from the file, by sendfile)."""
    handle = nbd.NBD()
    started = time.monotonic()
    try:
        handle.connect_uri(uri)
        handle.pwrite(b"\xc3" * BYSTANDER_BYTES, 8 * MiB)
        assert handle.pread(BYSTANDER_BYTES, 8 * MiB) == b"\xc3" * BYSTANDER_BYTES
        assert len(handle.pread(MiB, 0)) == MiB
    finally:
        close_handle(handle)
    return time.monotonic() - started


def hog(daemon: Daemon, read_hogs: int, write_hogs: int, rss_before: int) -> HogReport:
    """Open the hogs, let each send until refused, time a bystander while they hold, close
    them. ``rss_before``: the daemon's RSS before any hog connected."""
    with PeakRss(daemon.pid) as peak:
        bystander_s = _hold_and_time(daemon, read_hogs, write_hogs)
    return HogReport(rss_before, peak.peak, bystander_s)


def _hold_and_time(daemon: Daemon, read_hogs: int, write_hogs: int) -> float:
    """The hogs send until refused; a bystander's I/O is timed while they hold."""
    readers = open_hogs(daemon.nbd_port, read_hogs)
    writers = open_hogs(daemon.nbd_port, write_hogs)
    try:
        senders = [
            threading.Thread(target=send_until_refused, args=(h, read_burst(h, HOG_READS)))
            for h in readers
        ] + [
            threading.Thread(target=send_until_refused, args=(h, write_hog_bytes(h)))
            for h in writers
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
        return bystander_io(daemon.uri())
    finally:
        for h in readers + writers:
            h.close()
