"""Who may use an export and how: nbd.allow by client address, volumes[].read_only.

client from 127.0.0.2, allow [127.0.0.1] ──► closed before any byte, logged
read_only P-VOL (paired) ──► NBD_FLAG_READ_ONLY, writes EPERM, nothing journaled,
                             reads work; still read-only on the secondary after takeover
"""

from __future__ import annotations

import json
import socket
from typing import Any

import nbd
import pytest

from tests.e2e.helpers import (
    HOST,
    Daemons,
    MiB,
    close_handle,
    create_pair,
    display,
    pairctl,
    qemu_io,
    read_at,
    run,
    sha256_file,
    wait_caught_up,
    wait_until,
)
from tests.e2e.nbdsetup import log_lines, prepare_with_nbd, start_with_nbd
from tests.e2e.test_nbd_raw_socket import CMD_WRITE, DROP_TIMEOUT_S, RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

OTHER_LOOPBACK = "127.0.0.2"
EPERM = 1
VOLUMES = (("vol0", 16 * MiB), ("ref0", 16 * MiB))


def connect_from(source: str, port: int) -> socket.socket:
    return socket.create_connection(
        (HOST, port), timeout=DROP_TIMEOUT_S, source_address=(source, 0)
    )


def test_client_outside_the_allow_list_is_closed_before_any_byte(daemons: Daemons) -> None:
    daemon = start_with_nbd(daemons, nbd={"allow": [f"{HOST}/32", "10.0.0.0/8", "::1"]})
    offset = len(daemon.log_text())
    with connect_from(OTHER_LOOPBACK, daemon.nbd_port) as refused:
        port = refused.getsockname()[1]
        try:
            received = refused.recv(4096)
        except ConnectionResetError:
            received = b""
    assert received == b"", f"a refused client got {received!r}"
    line = wait_until(
        lambda: next(
            (ln for ln in log_lines(daemon, offset) if f"{OTHER_LOOPBACK}:{port} refused" in ln),
            None,
        ),
        timeout_s=10,
        what="a log line naming the refused client",
    )
    assert "not in nbd.allow" in line

    handle = nbd.NBD()  # from 127.0.0.1: allowed
    try:
        handle.connect_uri(daemon.uri())
        handle.pwrite(b"\x42" * 4096, 0)
        assert handle.pread(4096, 0) == b"\x42" * 4096
    finally:
        close_handle(handle)


def nbdinfo_export(uri: str) -> dict[str, Any]:
    info = json.loads(run(["nbdinfo", "--json", uri], timeout=30).stdout)
    export: dict[str, Any] = info["exports"][0]
    return export


@pytest.mark.timeout(120)
def test_read_only_volume_refuses_writes_journals_nothing_and_stays_so_after_takeover(
    daemons: Daemons,
) -> None:
    primary = start_with_nbd(daemons, read_only=["ref0"], volumes=VOLUMES)
    secondary = prepare_with_nbd(
        daemons, "secondary", read_only=["ref0"], volumes=VOLUMES, primary_port=primary.peer_port
    )
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    create_pair(primary, secondary)
    qemu_io(primary.uri("vol0"), "write -P 0x11 0 1M")  # journaled: proves the path is live
    wait_caught_up(primary)
    before = display(primary)
    ref_path = primary.volume("ref0").path
    ref_digest = sha256_file(ref_path)

    export = nbdinfo_export(primary.uri("ref0"))
    assert export["is_read_only"] is True, export
    assert nbdinfo_export(primary.uri("vol0"))["is_read_only"] is False
    for command in ("write -P 0xee 0 64k", "discard 0 64k", "write -z 0 64k"):
        proc = qemu_io(primary.uri("ref0"), command, check=False)
        assert proc.returncode != 0, (command, proc.stdout, proc.stderr)
    raw = RawClient(primary.nbd_port)  # a client that writes anyway: the server says EPERM
    try:
        raw.handshake("ref0")
        raw.sock.sendall(raw.request_header(CMD_WRITE, 0, 4096, cookie=9) + b"\xee" * 4096)
        assert raw.simple_reply() == (EPERM, 9)
    finally:
        raw.close()
    handle = nbd.NBD()
    try:
        handle.connect_uri(primary.uri("ref0"))
        assert handle.is_read_only()
        assert handle.pread(MiB, 0) == bytes(MiB)  # reads work
    finally:
        close_handle(handle)

    after = display(primary)
    assert sha256_file(ref_path) == ref_digest, "a read-only volume changed"
    assert after["seq"]["last"] == before["seq"]["last"], "a refused write was journaled"
    assert after["lag"]["entries"] == 0
    assert after["journal"]["used_bytes"] == before["journal"]["used_bytes"]

    primary.kill()
    wait_until(lambda: not display(secondary)["link"]["up"], 30, "the secondary to lose the link")
    assert pairctl(secondary, "takeover", check=False).returncode == 2  # S-VOL takeover
    assert nbdinfo_export(secondary.uri("vol0"))["is_read_only"] is False
    assert nbdinfo_export(secondary.uri("ref0"))["is_read_only"] is True
    assert qemu_io(secondary.uri("ref0"), "write -P 0xee 0 4k", check=False).returncode != 0
    qemu_io(secondary.uri("vol0"), "write -P 0x22 0 4k")
    assert read_at(secondary.volume("vol0").path, 0, 4096) == b"\x22" * 4096
    assert read_at(secondary.volume("vol0").path, 4096, 4096) == b"\x11" * 4096  # replicated
    assert read_at(secondary.volume("ref0").path, 0, MiB) == bytes(MiB)
