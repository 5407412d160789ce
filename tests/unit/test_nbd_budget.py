"""The NBD server's memory budget (common.nbd.budget), alone and under the real adapter.

Alone: shares, the pool, who is woken when. Under the adapter: the real NbdServer with a small
nbd.memory_limit, NbdConnections on fake transports whose clients read only when the test says
(tests/unit/test_nbd_backlog.py's UnreadSocket): hogs that never read stop at the budget, a
client within its share is served meanwhile, a big WRITE waits for the pool and goes through
once a hog's client reads, and a client waiting for memory is not taken for a stalled one.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from common.config import NbdConfig
from common.nbd import constants as c
from common.nbd.budget import MemoryBudget
from common.nbd.protocol import RECEIVE_BUFFER_BYTES
from common.nbd.server import REPLY_CHUNK_BYTES, NbdConnection, NbdServer
from common.volume import Volume
from tests.unit.test_nbd_backlog import READ_BYTES, UnreadSocket, read_burst, turn_the_loop
from tests.unit.test_nbd_protocol import go, request

pytestmark = pytest.mark.timeout(60)

KiB, MiB = 1 << 10, 1 << 20
SIMPLE_REPLY = struct.Struct(">IIQ")

# --- the budget alone -------------------------------------------------------------------------


def test_half_the_limit_is_shared_out_between_the_slots_and_half_is_the_pool() -> None:
    budget = MemoryBudget(64 * MiB, 4)
    assert budget.share_bytes == 8 * MiB
    assert budget.pool_bytes == 32 * MiB
    assert budget.room("a") == 40 * MiB


def test_a_holder_within_its_share_has_room_however_full_the_pool_is() -> None:
    budget = MemoryBudget(64 * MiB, 4)
    budget.hold("hog", 8 * MiB + 32 * MiB)  # its share and the whole pool
    assert budget.room("hog") == 0
    assert budget.room("small") == 8 * MiB
    budget.hold("small", 3 * MiB)
    assert budget.room("small") == 5 * MiB
    assert budget.held_bytes == 43 * MiB


def test_the_pool_goes_first_come_first_served() -> None:
    budget = MemoryBudget(64 * MiB, 4)
    budget.hold("a", 8 * MiB + 20 * MiB)
    assert budget.pool_free_bytes == 12 * MiB
    assert budget.room("b") == 8 * MiB + 12 * MiB
    budget.hold("b", 8 * MiB + 12 * MiB)
    assert budget.room("a") == budget.room("b") == 0
    assert budget.held_bytes <= budget.limit_bytes


def test_waiters_are_woken_in_order_only_when_pool_bytes_are_freed() -> None:
    budget = MemoryBudget(64 * MiB, 4)
    budget.hold("hog", 40 * MiB)
    budget.hold("small", 4 * MiB)
    budget.wait("big")
    budget.wait("other")
    assert budget.hold("small", 1 * MiB) == [], "within a share: the pool did not change"
    assert budget.hold("hog", 41 * MiB) == [], "more held: nobody to wake"
    assert budget.hold("hog", 30 * MiB) == ["big", "other"]
    assert budget.hold("hog", 0) == [], "woken once: a waiter still short waits again"
    budget.wait("big")
    budget.hold("big", 20 * MiB)
    assert budget.forget("big") == []
    budget.hold("x", 30 * MiB)
    budget.wait("y")
    assert budget.forget("x") == ["y"]
    assert budget.held_bytes == 1 * MiB  # "small" alone


def test_forgetting_a_holder_that_never_held_is_harmless() -> None:
    budget = MemoryBudget(64 * MiB, 4)
    assert budget.forget("never") == []
    assert budget.held_bytes == 0


def test_a_budget_too_small_for_its_holders_is_a_bug_of_the_caller() -> None:
    with pytest.raises(ValueError):
        MemoryBudget(3, 2)


# --- under the adapter ------------------------------------------------------------------------

LIMIT_BYTES = 64 * MiB
SLOTS = 4  # share 8 MiB each, pool 32 MiB
# One check of the budget can be passed by a READ's reply made just before it (as with the
# reply backlog: tests/unit/test_nbd_backlog.py's HELD_MAX_BYTES).
SLACK_BYTES = REPLY_CHUNK_BYTES + READ_BYTES


def small_server(tmp_path: Path) -> NbdServer:
    volume = Volume.open_or_create("vol0", tmp_path / "vol0.img", 64 * MiB)
    volume.write(0, b"\x5a" * MiB)
    limits = NbdConfig(memory_limit=LIMIT_BYTES, max_connections=SLOTS)
    return NbdServer({"vol0": volume}, limits=limits)


def connect(server: NbdServer) -> tuple[NbdConnection, UnreadSocket]:
    conn = NbdConnection(server)
    sock = UnreadSocket(conn)
    conn.connection_made(sock)  # type: ignore[arg-type]
    flags = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES)
    assert sock.receive(flags + go("vol0")) == b""
    while sock.unread:
        sock.drain()
    sock.delivered.clear()
    return conn, sock


def memory_of(sock: UnreadSocket) -> int:
    conn = sock.protocol
    assert conn._sender is not None
    extra = max(0, conn._core.buffer_bytes - RECEIVE_BUFFER_BYTES)
    return conn._sender.memory_bytes + extra


def test_hogs_stop_at_the_budget_and_a_client_within_its_share_is_served(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        server = small_server(tmp_path)
        hogs = [connect(server)[1] for _ in range(2)]
        for hog in hogs:
            hog.receive(read_burst())
            assert not hog.reading, "a hog past its room must stop being read"
        first, second = (memory_of(hog) for hog in hogs)
        assert first <= 8 * MiB + 32 * MiB + SLACK_BYTES, first / MiB  # its share + the pool
        assert second <= 8 * MiB + SLACK_BYTES, second / MiB  # the pool was taken
        assert server.budget.held_bytes <= LIMIT_BYTES + 2 * SLACK_BYTES
        _conn, small = connect(server)
        reads = b"".join(request(c.Cmd.READ, 0, 4 * KiB, handle=i) for i in range(32))
        assert small.receive(reads) == b""
        small.drain()
        assert len(small.delivered) == 32 * (SIMPLE_REPLY.size + 4 * KiB)
        assert small.reading
        await turn_the_loop()

    asyncio.run(scenario())


def test_a_big_write_waits_for_the_pool_and_goes_through_once_a_hog_is_read(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        server = small_server(tmp_path)
        _hog_conn, hog = connect(server)
        hog.receive(read_burst())
        writer_conn, writer = connect(server)
        payload = b"\xa7" * (16 * MiB)
        data = request(c.Cmd.WRITE, 32 * MiB, len(payload), handle=7) + payload
        kept = writer.receive(data)
        assert not writer.reading and kept, "the payload must wait: the pool is taken"
        assert writer_conn._core.buffer_bytes <= RECEIVE_BUFFER_BYTES, "grew without room"
        now = asyncio.get_running_loop().time()
        stall_s = server.limits.stall_timeout_s
        assert writer_conn.overdue(now) is None
        assert writer_conn.overdue(now + 2 * stall_s) is None, "waiting for memory: no stall"

        for _ in range(200):  # the hog's client reads; its room goes to the others
            if writer.reading:
                break
            hog.drain()
            await turn_the_loop()
        assert writer.reading, "the writer never got its turn"
        assert writer.receive(kept) == b""
        assert SIMPLE_REPLY.unpack(bytes(writer.unread[0][:16])) == (c.SIMPLE_REPLY_MAGIC, 0, 7)
        volume = server.exports["vol0"].volume
        assert volume.read(32 * MiB, len(payload)) == payload
        assert writer_conn._core.buffer_bytes == RECEIVE_BUFFER_BYTES, "big buffer kept idle"

    asyncio.run(scenario())


def test_memory_held_by_a_connection_is_given_back_when_it_goes(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = small_server(tmp_path)
        hog_conn, hog = connect(server)
        hog.receive(read_burst())
        _waiter_conn, waiter = connect(server)
        waiter.receive(read_burst())
        assert not waiter.reading
        held = server.budget.held_bytes
        hog_conn.connection_lost(None)
        assert server.budget.held_bytes <= held - 32 * MiB
        await turn_the_loop()
        assert memory_of(waiter) > 8 * MiB + SLACK_BYTES, "the waiter did not take the pool"

    asyncio.run(scenario())
