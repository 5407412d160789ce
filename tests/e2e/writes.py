"""Numbered, checksummed host writes and the check that a copy holds a prefix of them.

    slots: 2 volumes x 512 slots, a 4 KiB block every 16 KiB; slot s is in vol(s % 2)
    block n = (n, slot, crc32 of the body) + body = Random(n) bytes: a block is one whole
              write or it is torn; n is unique over a whole run, so a block names its write

    BlockWriter (a thread, one libnbd handle per volume, QD1 or QD32 with aio_pwrite)
      owns its slots (no other writer touches them) and never has two writes to one slot in
      flight, so the writes to a slot are totally ordered; for every write it records
        n, slot, submit_ns (taken before aio_pwrite), ack_ns (taken after it saw the reply)

The check (check_prefix). With QD32, writes in flight together have no defined order, so a
"prefix of the acknowledged order" means a set closed under happens-before:

    w1 ack'd ─┐
              │  before    w2 submitted          then w1 happened before w2: a copy that
              └──────────► (w1.ack_ns < w2.submit_ns)  holds w2 must hold w1 (or a later
                                                   write to w1's slot)
    w3 ──submitted──────────────acked
    w4     ──submitted──────acked                  w3 and w4 overlap: either may be there
                                                   alone
    Per slot the copy holds write j of its writes w_1..w_m (or its content before the
    round, j = 0): writes w_1..w_j are INCLUDED (w_j, or overwritten by it), w_j+1.. are not.
    The copy is a prefix when
      - every slot holds exactly one whole block, one of its own writes or its baseline
        (a torn, foreign or stray block is a mismatch);
      - for every slot's held write w, every write x with x.ack_ns < w.submit_ns is included
        (else a mix: w without an earlier acknowledged x; it is enough to test the first
        write not included of each slot, as its slot's later writes were acked after it).
    LOST = acknowledged writes not included; RPO = their count, and in seconds the time
    from the newest included acknowledged write's ack to the last ack of the round.

The times are taken on one monotonic clock, submit before the request goes out and ack after
the reply came, so "x.ack_ns < w.submit_ns" only ever claims an order that really held.
"""

from __future__ import annotations

import itertools
import random
import select
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from tests.e2e.helpers import Daemon, MiB, close_handle

BLOCK = 4096
SLOT_STRIDE = 16 * 1024
SLOTS_PER_VOLUME = 512
VOLUMES = (("vol0", 8 * MiB), ("vol1", 8 * MiB))
SLOTS = len(VOLUMES) * SLOTS_PER_VOLUME
_HEADER = struct.Struct("<QII")  # n, slot, crc32 of the rest
READ_CHUNK = 1 * MiB
WRITER_HANG_S = 30.0  # no reply for this long: the writer reports a hang instead of waiting


def slot_location(slot: int) -> tuple[str, int]:
    """Slots alternate between the two volumes, spread over each (a 16 KiB stride)."""
    volume = VOLUMES[slot % 2][0]
    return volume, (slot // 2) * SLOT_STRIDE


def block(n: int, slot: int) -> bytes:
    body = random.Random(n).randbytes(BLOCK - _HEADER.size)
    return _HEADER.pack(n, slot, zlib.crc32(body)) + body


def block_number(data: bytes, slot: int) -> int | None:
    """The write number a slot holds: 0 never written, None not one whole block of this slot."""
    if data == bytes(BLOCK):
        return 0
    n, found_slot, crc = _HEADER.unpack_from(data)
    if found_slot != slot or crc != zlib.crc32(data[_HEADER.size :]):
        return None
    return int(n)


@dataclass
class Write:
    n: int
    slot: int
    submit_ns: int
    ack_ns: int | None = None  # None: never acknowledged (in flight when it ended)


@dataclass
class SlotImage:
    """What a copy holds: slot -> write number (0 never written, None torn or foreign)."""

    numbers: dict[int, int | None]
    stray: list[str] = field(default_factory=list)  # non-zero bytes between the slots


def parse_volumes(contents: Mapping[str, bytes]) -> SlotImage:
    image = SlotImage({})
    for slot in range(SLOTS):
        volume, offset = slot_location(slot)
        image.numbers[slot] = block_number(contents[volume][offset : offset + BLOCK], slot)
    for volume, data in contents.items():
        for offset in range(0, len(data), SLOT_STRIDE):
            gap = data[offset + BLOCK : offset + SLOT_STRIDE]
            if gap.count(0) != len(gap):
                image.stray.append(f"{volume}: non-zero bytes between slots at {offset + BLOCK}")
    return image


def read_files(daemon: Daemon) -> SlotImage:
    """The slots as the volume files hold them (for a process that cannot answer: SIGSTOP)."""
    return parse_volumes({name: Path(daemon.volume(name).path).read_bytes() for name, _ in VOLUMES})


def read_nbd(daemon: Daemon) -> SlotImage:
    """The slots as the daemon's NBD exports serve them."""
    contents = {}
    for name, size in VOLUMES:
        handle = nbd.NBD()
        try:
            handle.connect_uri(daemon.uri(name))
            contents[name] = b"".join(
                handle.pread(READ_CHUNK, offset) for offset in range(0, size, READ_CHUNK)
            )
        finally:
            close_handle(handle)
    return parse_volumes(contents)


# --- writers --------------------------------------------------------------------------------


def _pump(handles: Iterable[Any], timeout_s: float) -> None:
    """Move every handle's state machine on once its socket is ready (or timeout_s passed)."""
    fds: dict[int, Any] = {}
    readers, writers = [], []
    for handle in handles:
        fd = handle.aio_get_fd()
        fds[fd] = handle
        direction = handle.aio_get_direction()
        if direction & nbd.AIO_DIRECTION_READ:
            readers.append(fd)
        if direction & nbd.AIO_DIRECTION_WRITE:
            writers.append(fd)
    readable, writable, _ = select.select(readers, writers, [], timeout_s)
    for fd in readable:
        fds[fd].aio_notify_read()
    for fd in writable:
        fds[fd].aio_notify_write()


class BlockWriter(threading.Thread):
    """Writes numbered blocks to its own slots, up to ``depth`` in flight, until stopped, its
    connection dies (the primary was killed) or ``limit`` writes are done."""

    def __init__(
        self,
        daemon: Daemon,
        slots: Sequence[int],
        depth: int,
        numbers: Iterator[int],
        seed: int,
        limit: int | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"writer-qd{depth}")
        self.uris = {name: daemon.uri(name) for name, _ in VOLUMES}
        self.slots, self.depth, self.numbers, self.limit = list(slots), depth, numbers, limit
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.log: list[Write] = []
        self._lock = threading.Lock()
        self.ended_by: BaseException | None = None

    def snapshot(self) -> list[Write]:
        """The writes so far (copies: acks that come later do not change them)."""
        with self._lock:
            return [Write(w.n, w.slot, w.submit_ns, w.ack_ns) for w in self.log]

    def acked(self) -> int:
        with self._lock:
            return sum(w.ack_ns is not None for w in self.log)

    def run(self) -> None:
        handles: dict[str, Any] = {}
        try:
            for name, uri in self.uris.items():
                handles[name] = nbd.NBD()
                handles[name].connect_uri(uri)
            self._write(handles)
        except BaseException as exc:  # a killed primary ends it here; the caller decides
            self.ended_by = exc
        finally:
            for handle in handles.values():
                close_handle(handle)

    def _write(self, handles: dict[str, Any]) -> None:
        in_flight: dict[tuple[str, int], Write] = {}
        busy: set[int] = set()
        last_progress = time.monotonic()
        while True:
            while len(in_flight) < self.depth and not self._done():
                write = self._submit(handles, in_flight, busy)
                with self._lock:
                    self.log.append(write)
            if not in_flight:
                return
            _pump(handles.values(), 0.1)
            for key, write in list(in_flight.items()):
                if handles[key[0]].aio_command_completed(key[1]):  # raises when it failed
                    with self._lock:
                        write.ack_ns = time.monotonic_ns()
                    del in_flight[key]
                    busy.discard(write.slot)
                    last_progress = time.monotonic()
            if time.monotonic() - last_progress > WRITER_HANG_S:
                raise AssertionError(f"no write acknowledged for {WRITER_HANG_S} s (hang)")

    def _done(self) -> bool:
        return self.stop.is_set() or (self.limit is not None and len(self.log) >= self.limit)

    def _submit(
        self, handles: dict[str, Any], in_flight: dict[tuple[str, int], Write], busy: set[int]
    ) -> Write:
        slot = self.rng.choice(self.slots)
        while slot in busy:
            slot = self.rng.choice(self.slots)
        n = next(self.numbers)
        volume, offset = slot_location(slot)
        # A bytearray, not an nbd.Buffer: python3-libnbd 1.14 never frees a Buffer given to
        # aio_pwrite (4 KiB per write: a 35-minute soak's runner reached 24 GiB, OOM-killed).
        write = Write(n, slot, time.monotonic_ns())
        in_flight[(volume, handles[volume].aio_pwrite(bytearray(block(n, slot)), offset))] = write
        busy.add(slot)
        return write

    def finish(self, timeout_s: float = 30.0) -> None:
        """Stop after the writes in flight; the writer must have ended by itself cleanly."""
        self.stop.set()
        self.join(timeout_s)
        assert not self.is_alive(), f"{self.name} still running {timeout_s} s after stop"
        assert self.ended_by is None, f"{self.name} failed: {self.ended_by!r}"

    def finish_after_kill(self, timeout_s: float = 30.0) -> None:
        """The primary was killed: the connection fails, which ends the writer."""
        self.stop.set()
        self.join(timeout_s)
        assert not self.is_alive(), f"{self.name} hung after the primary died"


class Writers:
    """A QD1 and a QD32 writer on one daemon, each owning half the slots of each volume."""

    def __init__(
        self, daemon: Daemon, numbers: Iterator[int], seed: int, depths: Sequence[int] = (1, 32)
    ) -> None:
        rng = random.Random(seed)
        self.all = [
            BlockWriter(
                daemon,
                [s for s in range(SLOTS) if (s // 2) % len(depths) == i],
                depth,
                numbers,
                rng.randrange(1 << 32),
            )
            for i, depth in enumerate(depths)
        ]

    def __enter__(self) -> Writers:
        for writer in self.all:
            writer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in self.all:  # a failing round must not leave writers running
            writer.stop.set()
        for writer in self.all:
            writer.join(WRITER_HANG_S)

    def acked(self) -> int:
        return sum(writer.acked() for writer in self.all)

    def snapshot(self) -> list[Write]:
        return [w for writer in self.all for w in writer.snapshot()]

    def finish(self) -> None:
        for writer in self.all:
            writer.finish()

    def finish_after_kill(self) -> None:
        for writer in self.all:
            writer.finish_after_kill()


def write_numbers(start: int = 1) -> Iterator[int]:
    """Unique write numbers for a whole run (itertools.count's next() is atomic in CPython)."""
    return itertools.count(start)


# --- the check ------------------------------------------------------------------------------


@dataclass
class Verdict:
    mismatches: list[str]
    acked: int
    included: int  # writes of the round the copy holds (found, or overwritten by what is found)
    lost: int  # acknowledged, not included
    rpo_s: float

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_prefix(image: SlotImage, baseline: Mapping[int, int], writes: Sequence[Write]) -> Verdict:
    """Is ``image`` the slots' ``baseline`` after a happens-before-closed set of ``writes``?"""
    per_slot: dict[int, list[Write]] = {}
    for write in sorted(writes, key=lambda w: w.submit_ns):
        per_slot.setdefault(write.slot, []).append(write)
    mismatches = list(image.stray)
    held: dict[int, int] = {}  # slot -> how many of its writes are included
    for slot, number in image.numbers.items():
        own = per_slot.get(slot, [])
        if number is None:
            mismatches.append(f"slot {slot}: torn or foreign block")
        elif number == baseline.get(slot, 0):
            held[slot] = 0
        elif number in (numbers := [w.n for w in own]):
            held[slot] = numbers.index(number) + 1
        else:
            mismatches.append(f"slot {slot}: holds write {number}, not one of its writes")
    mismatches += _happens_before_holes(per_slot, held)
    included = [w for slot, count in held.items() for w in per_slot.get(slot, [])[:count]]
    acked = [w.ack_ns for w in writes if w.ack_ns is not None]
    included_acks = [w.ack_ns for w in included if w.ack_ns is not None]
    lost = len(acked) - len(included_acks)
    first = min((w.submit_ns for w in writes), default=0)
    rpo_ns = max(acked) - max(included_acks, default=first) if lost else 0
    return Verdict(mismatches, len(acked), len(included), lost, rpo_ns / 1e9)


def _happens_before_holes(
    per_slot: Mapping[int, list[Write]], held: Mapping[int, int]
) -> list[str]:
    """Each held write submitted after the ack of a write that is not included: a mix."""
    missing = [
        (own[held[slot]], slot)
        for slot, own in per_slot.items()
        if slot in held and held[slot] < len(own) and own[held[slot]].ack_ns is not None
    ]
    if not missing:
        return []
    first_ack_ns, hole_slot = min((w.ack_ns or 0, slot) for w, slot in missing)
    hole = per_slot[hole_slot][held[hole_slot]]
    problems = []
    for slot, count in held.items():
        if count and per_slot[slot][count - 1].submit_ns > first_ack_ns:
            found = per_slot[slot][count - 1]
            problems.append(
                f"slot {slot}: holds write {found.n}, submitted after write {hole.n} to slot "
                f"{hole_slot} was acknowledged, but slot {hole_slot} does not hold it"
            )
    return problems


def baseline_of(image: SlotImage) -> dict[int, int]:
    """The slots' numbers as a round starts (a torn slot there is a failure of the last one)."""
    torn = [slot for slot, n in image.numbers.items() if n is None]
    assert not torn and not image.stray, f"torn slots {torn[:10]} {image.stray[:3]} at start"
    return {slot: n for slot, n in image.numbers.items() if n is not None}
