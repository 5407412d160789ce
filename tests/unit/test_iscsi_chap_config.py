"""Failed iSCSI logins logged as warnings, a limited number per interval."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from common.iscsi.chap import ChapSecrets
from common.iscsi.pdu import BHS_BYTES, Op, decode_bhs, encode_pdu
from common.iscsi.server import IscsiServer
from common.iscsi.target import Closing
from common.nbd.guard import LogLimiter
from common.volume import Volume
from tests.unit.test_iscsi_core import INITIATOR, login_pdu
from tests.unit.test_iscsi_session import NAMES, SECRETS, chap_login_until_challenge, session_with

SECRET = b"sixteen-bytes-ok"


# --- failed logins in the adapter's log -----------------------------------------------------


def test_the_core_tells_an_authentication_failure_from_other_login_refusals() -> None:
    wrong_secret = session_with(chap=SECRETS)
    chap_login_until_challenge(wrong_secret)
    pdu = login_pdu([("CHAP_N", "alice"), ("CHAP_R", "0x" + bytes(16).hex())], 0, 1)
    assert wrong_secret.send(pdu) == [
        Closing("login refused: CHAP user 'alice': wrong user or response", True)
    ]
    no_such_target = session_with(chap=None)
    names = [(k, "iqn.2026-01.org.example:other" if k == "TargetName" else v) for k, v in NAMES]
    (closing,) = no_such_target.send(login_pdu([*names, ("AuthMethod", "None")], 0, 1))
    assert isinstance(closing, Closing) and not closing.authentication_failed, closing


async def refused_login(port: int) -> bytes:
    """A login offering AuthMethod=None to a target that requires CHAP: the Login Response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    names = [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]
    writer.write(encode_pdu(login_pdu(names, 0, 1)))
    response = await reader.readexactly(BHS_BYTES)
    assert await reader.read() == b""  # the target closes the connection
    writer.close()
    return response


def test_failed_authentications_are_warnings_limited_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    interval_s = 1.0

    async def main() -> None:
        volume = Volume.open_or_create("vol0", tmp_path / "vol0.img", 1 << 20)
        server = IscsiServer(
            "iqn.2026-01.org.journalpair:jg0", [volume], chap=ChapSecrets("alice", SECRET)
        )
        server._auth_failures = LogLimiter(burst=2, interval_s=interval_s)
        _, port = await server.start("127.0.0.1", 0)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(5):
                pdu, _, _ = decode_bhs(await refused_login(port))
                assert pdu.opcode == Op.LOGIN_RSP
                assert pdu.field32(36) >> 16 == 0x0201  # authentication failure
            assert loop.time() - started < interval_s, "too slow to test the limit"
            await asyncio.sleep(interval_s)  # the interval of the first line is over
            await refused_login(port)
        finally:
            await server.stop()
            volume.close()

    with caplog.at_level(logging.INFO, logger="journalpair.iscsi"):
        asyncio.run(main())
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    failed = f"initiator 127.0.0.1:{{}} ({INITIATOR}) failed authentication, login refused: "
    warnings = [text for level, text in lines if level == logging.WARNING]
    assert len(warnings) == 4, lines  # 2 of the first 5, the count, then the 6th
    assert warnings[2] == "3 more like the next line were not logged one by one", warnings
    for text in (warnings[0], warnings[1], warnings[3]):
        peer_port = text.split(":")[1].split(" ")[0]
        assert text == failed.format(peer_port) + "CHAP is required; AuthMethod None", text
    assert not [text for level, text in lines if "closing" in text], lines
