"""python3-libnbd against the exports: errors per the NBD spec, replies, extents, multi-conn.

libnbd checks many requests itself before sending them (strict mode); the tests that are about
the server's answer turn that off with ``set_strict_mode(0)`` so the request reaches the server.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import nbd
import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    KiB,
    MiB,
    allocated_bytes,
    close_handle,
    errno_name,
    nbd_errno,
    read_at,
    wait_command,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def connect(uri: str, *, strict: bool = True, structured: bool = True) -> nbd.NBD:
    handle = nbd.NBD()
    handle.set_request_structured_replies(structured)
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    if not strict:
        handle.set_strict_mode(0)
    return handle


@pytest.fixture
def handle(primary: Daemon) -> Iterator[nbd.NBD]:
    h = connect(primary.uri(), strict=False)
    yield h
    close_handle(h)


def expect_errno(expected: int, call: object, *args: object) -> None:
    assert callable(call)
    with pytest.raises(nbd.Error) as info:
        call(*args)
    got = nbd_errno(info.value)
    assert got == expected, f"expected {errno_name(expected)}, got {errno_name(got)}: {info.value}"


def extents_of(h: nbd.NBD, length: int, offset: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) from base:allocation, following up until ``length`` is covered."""
    found: list[tuple[int, int, int]] = []
    position, end = offset, offset + length

    def extent(context: str, start: int, entries: list[int], err: int) -> int:
        nonlocal position
        if context != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        assert start == position, (start, position)
        for index in range(0, len(entries), 2):
            found.append((position, entries[index], entries[index + 1]))
            position += entries[index]
        return 0

    while position < end:
        before = position
        h.block_status(end - position, position, extent)
        assert position > before, "block status made no progress"
    return found


def flags_at(extents: list[tuple[int, int, int]], start: int, end: int) -> set[int]:
    return {flags for off, length, flags in extents if off < end and off + length > start}


# --- errors -----------------------------------------------------------------------------------


def test_read_past_end_is_einval_and_connection_stays_usable(handle: nbd.NBD) -> None:
    size = handle.get_size()
    expect_errno(errno.EINVAL, handle.pread, 4096, size)
    expect_errno(errno.EINVAL, handle.pread, 8192, size - 4096)  # straddles the end
    assert handle.pread(4096, size - 4096) == bytes(4096)


def test_write_past_end_is_enospc_and_connection_stays_usable(
    handle: nbd.NBD, primary: Daemon
) -> None:
    size = handle.get_size()
    handle.pwrite(b"\x42" * 4096, 0)

    expect_errno(errno.ENOSPC, handle.pwrite, b"\x99" * 65536, size)
    expect_errno(errno.ENOSPC, handle.pwrite, b"\x99" * 8192, size - 4096)
    expect_errno(errno.ENOSPC, handle.zero, 65536, size)

    # The payload of the refused write was consumed: the next requests parse and work.
    assert handle.pread(4096, 0) == b"\x42" * 4096
    assert handle.pread(4096, size - 4096) == bytes(4096), "partial write past the end applied"
    assert primary.volume().path.stat().st_size == size, "volume file grew"


def test_trim_past_end_is_einval(handle: nbd.NBD) -> None:
    expect_errno(errno.EINVAL, handle.trim, 65536, handle.get_size())
    assert handle.pread(512, 0) == bytes(512)


def test_write_to_read_only_secondary_is_eperm(secondary: Daemon) -> None:
    h = connect(secondary.uri(), strict=False)
    try:
        assert h.is_read_only()
        expect_errno(errno.EPERM, h.pwrite, b"\x01" * 4096, 0)
        expect_errno(errno.EPERM, h.pwrite, b"\x01" * 4096, 0, nbd.CMD_FLAG_FUA)
        expect_errno(errno.EPERM, h.zero, 4096, 0)
        expect_errno(errno.EPERM, h.trim, 4096, 0)
        assert h.pread(4096, 0) == bytes(4096)
    finally:
        close_handle(h)
    assert read_at(secondary.volume().path, 0, 4096) == bytes(4096)


def test_unknown_export_name_fails_to_connect_and_server_carries_on(primary: Daemon) -> None:
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(primary.uri("no-such-volume"))
    close_handle(h)

    h = connect(primary.uri())
    assert h.get_size() == 64 * MiB
    close_handle(h)


@pytest.mark.parametrize("command", ["read", "write"])
def test_request_over_32mib_is_refused_without_hanging(primary: Daemon, command: str) -> None:
    h = connect(primary.uri(), strict=False)
    try:
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        length = 32 * MiB + 4096
        if command == "write":
            cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\xaa" * length)), 0)
        else:
            cookie = h.aio_pread(nbd.Buffer(length), 0)
        # Refused with an error, or the connection dropped: both are nbd.Error. A hang fails.
        with pytest.raises(nbd.Error):
            wait_command(h, cookie, timeout_s=10)
    finally:
        close_handle(h)

    other = connect(primary.uri())
    assert other.pread(4096, 0) == bytes(4096), "oversized write was applied"
    close_handle(other)


# --- commands ---------------------------------------------------------------------------------


def test_flush_and_fua_writes_reach_the_volume_file(handle: nbd.NBD, primary: Daemon) -> None:
    assert handle.can_flush() and handle.can_fua()
    handle.pwrite(b"\x11" * 65536, 0)
    handle.flush()
    handle.pwrite(b"\x22" * 65536, 65536, nbd.CMD_FLAG_FUA)

    path = primary.volume().path
    assert read_at(path, 0, 65536) == b"\x11" * 65536
    assert read_at(path, 65536, 65536) == b"\x22" * 65536
    assert handle.pread(131072, 0) == b"\x11" * 65536 + b"\x22" * 65536


def test_trim_punches_a_hole_and_reads_back_zeros(handle: nbd.NBD, primary: Daemon) -> None:
    path = primary.volume().path
    handle.pwrite(b"\x33" * (4 * MiB), 0)
    handle.flush()
    before = allocated_bytes(path)

    handle.trim(2 * MiB, MiB)

    assert handle.pread(2 * MiB, MiB) == bytes(2 * MiB)
    assert handle.pread(MiB, 0) == b"\x33" * MiB
    assert handle.pread(MiB, 3 * MiB) == b"\x33" * MiB
    assert allocated_bytes(path) <= before - 2 * MiB, "TRIM did not punch a hole"
    assert flags_at(extents_of(handle, 2 * MiB, MiB), MiB, 3 * MiB) == {
        nbd.STATE_HOLE | nbd.STATE_ZERO
    }


def test_write_zeroes_variants_read_back_zeros(handle: nbd.NBD, primary: Daemon) -> None:
    path = primary.volume().path
    handle.pwrite(b"\x44" * (4 * MiB), 0)
    handle.flush()
    allocated = allocated_bytes(path)

    handle.zero(MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    assert allocated_bytes(path) >= allocated, "WRITE_ZEROES with NO_HOLE punched a hole"
    handle.zero(MiB, MiB)
    handle.zero(MiB, 2 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    handle.zero(4096, 3 * MiB + 512, nbd.CMD_FLAG_FUA)

    assert handle.pread(3 * MiB, 0) == bytes(3 * MiB)
    tail = handle.pread(MiB, 3 * MiB)
    assert tail == b"\x44" * 512 + bytes(4096) + b"\x44" * (MiB - 4096 - 512)
    assert read_at(path, 0, 4 * MiB) == bytes(3 * MiB) + tail


def test_cache_is_accepted(handle: nbd.NBD) -> None:
    assert handle.can_cache()
    handle.cache(MiB, 0)
    assert handle.pread(4096, 0) == bytes(4096)


# --- replies and extents ----------------------------------------------------------------------


def test_structured_replies_negotiated_and_holes_read_as_hole_chunks(handle: nbd.NBD) -> None:
    assert handle.get_structured_replies_negotiated()
    handle.pwrite(b"\x55" * 65536, 0)
    chunks: list[tuple[int, int, int]] = []

    def chunk(buf: bytes, offset: int, status: int, err: int) -> int:
        chunks.append((offset, len(buf), status))
        return 0

    handle.pread_structured(MiB, 8 * MiB, chunk)  # all hole
    assert chunks and {status for _, _, status in chunks} == {nbd.READ_HOLE}, chunks
    assert sum(length for _, length, _ in chunks) == MiB

    chunks.clear()
    data = handle.pread_structured(65536, 0, chunk)
    assert data == b"\x55" * 65536
    assert {status for _, _, status in chunks} == {nbd.READ_DATA}, chunks


def test_simple_replies_when_client_does_not_ask_for_structured(primary: Daemon) -> None:
    h = connect(primary.uri(), strict=False, structured=False)
    try:
        assert not h.get_structured_replies_negotiated()
        h.pwrite(b"\x66" * 8192, 4096)
        assert h.pread(16384, 0) == bytes(4096) + b"\x66" * 8192 + bytes(4096)
        expect_errno(errno.EINVAL, h.pread, 4096, h.get_size())
        assert h.pread(4096, 4096) == b"\x66" * 4096, "connection unusable after an error"
    finally:
        close_handle(h)


def test_block_status_reports_hole_then_data(handle: nbd.NBD) -> None:
    assert handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    size = handle.get_size()
    empty = extents_of(handle, size, 0)
    assert {flags for _, _, flags in empty} == {nbd.STATE_HOLE | nbd.STATE_ZERO}, empty

    handle.pwrite(b"\x77" * MiB, 4 * MiB)

    extents = extents_of(handle, size, 0)
    assert sum(length for _, length, _ in extents) == size
    assert flags_at(extents, 4 * MiB, 5 * MiB) == {0}, extents
    assert flags_at(extents, 0, 4 * MiB) == {nbd.STATE_HOLE | nbd.STATE_ZERO}, extents
    assert flags_at(extents, 5 * MiB, size) == {nbd.STATE_HOLE | nbd.STATE_ZERO}, extents


# --- concurrency ------------------------------------------------------------------------------


def test_two_connections_see_each_others_writes(primary: Daemon) -> None:
    first, second = connect(primary.uri()), connect(primary.uri())
    try:
        assert first.can_multi_conn() and second.can_multi_conn()
        first.pwrite(b"\x88" * 65536, MiB)
        first.flush()
        assert second.pread(65536, MiB) == b"\x88" * 65536

        second.pwrite(b"\x99" * 4096, MiB + 4096, nbd.CMD_FLAG_FUA)
        second.flush()
        assert first.pread(8192, MiB) == b"\x88" * 4096 + b"\x99" * 4096
    finally:
        close_handle(first)
        close_handle(second)


def test_many_pipelined_aio_pwrites_then_aio_flush(handle: nbd.NBD, primary: Daemon) -> None:
    count, length = 128, 32 * KiB
    cookies = []
    for i in range(count):
        buf = nbd.Buffer.from_bytearray(bytearray([i % 251 + 1]) * length)
        cookies.append(handle.aio_pwrite(buf, i * length))
    assert handle.aio_in_flight() > 1, "writes were not pipelined"
    flush = handle.aio_flush()

    for cookie in [*cookies, flush]:
        assert wait_command(handle, cookie, timeout_s=20)

    data = handle.pread(count * length, 0)
    path = primary.volume().path
    for i in range(count):
        expected = bytes([i % 251 + 1]) * length
        assert data[i * length : (i + 1) * length] == expected, f"write {i} over NBD"
        assert read_at(path, i * length, length) == expected, f"write {i} in the volume file"


def test_option_mode_lists_exports_and_meta_contexts(daemons: Daemons) -> None:
    primary = daemons.start_primary(volumes=[("vol0", 64 * MiB), ("vol1", 8 * MiB)])
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(primary.base_uri)
    try:
        names: list[str] = []

        def listed(name: str, description: str) -> int:
            names.append(name)
            return 0

        h.opt_list(listed)
        assert sorted(names) == ["vol0", "vol1"]

        h.set_export_name("vol1")
        h.opt_info()
        assert h.get_size() == 8 * MiB

        contexts: list[str] = []

        def context(name: str) -> int:
            contexts.append(name)
            return 0

        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        count = h.opt_list_meta_context(context)
        assert count >= 1 and nbd.CONTEXT_BASE_ALLOCATION in contexts, contexts

        h.opt_go()
        assert h.get_size() == 8 * MiB
        assert h.pread(4096, 0) == bytes(4096)
    finally:
        close_handle(h)
