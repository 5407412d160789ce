"""CHAP from the daemons' config (iscsi.chap, common.iscsi.credentials), iSCSI beyond
loopback without it, and failed logins logged as warnings, a limited number per interval."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from common.config import Config, ConfigError, load_config
from common.iscsi.chap import ChapSecrets
from common.iscsi.credentials import describe, load_chap
from common.iscsi.pdu import BHS_BYTES, Op, decode_bhs, encode_pdu
from common.iscsi.server import IscsiServer
from common.iscsi.target import Closing
from common.nbd.guard import LogLimiter
from common.volume import Volume
from tests.unit.test_iscsi_core import INITIATOR, login_pdu
from tests.unit.test_iscsi_session import NAMES, SECRETS, chap_login_until_challenge, session_with

BASE = """\
role: {role}
group: jg0
data_dir: data
listen:
  nbd: 127.0.0.1:10809
{peer}
control: site.sock
journal: {{capacity: 64MiB}}
volumes:
  - {{name: vol0, path: vol0.img, size: 1MiB}}
"""
PEERS = {"primary": "  replication: 127.0.0.1:7410", "secondary": "primary: 127.0.0.1:7410"}
SECRET = b"sixteen-bytes-ok"
TARGET_SECRET = b"target-secret-16"


def config_with(tmp_path: Path, iscsi: str, role: str = "primary") -> Config:
    path = tmp_path / "site.yaml"
    path.write_text(BASE.format(role=role, peer=PEERS[role]) + f"iscsi: {iscsi}\n")
    return load_config(path)


def secret_file(tmp_path: Path, name: str, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


CHAP = "{listen: '127.0.0.1:3260', chap: {user: alice, secret_file: chap.key}}"
MUTUAL = (
    "{listen: '127.0.0.1:3260', chap: {user: alice, secret_file: chap.key,"
    " mutual_user: jp-target, mutual_secret_file: target.key}}"
)


def test_no_chap_section_means_no_authentication(tmp_path: Path) -> None:
    iscsi = config_with(tmp_path, "{listen: '127.0.0.1:3260'}").iscsi
    assert load_chap(iscsi) is None
    assert describe(iscsi) == "no authentication (loopback only)"


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_chap_is_read_from_the_secret_file_without_its_line_ending(
    tmp_path: Path, role: str
) -> None:
    secret_file(tmp_path, "chap.key", SECRET + b"\r\n")
    iscsi = config_with(tmp_path, CHAP, role).iscsi
    assert iscsi.chap_secret_file == tmp_path / "chap.key"  # relative to the config
    assert load_chap(iscsi) == ChapSecrets("alice", SECRET)
    assert describe(iscsi) == "CHAP (initiator user 'alice')"


def test_mutual_chap_reads_both_files(tmp_path: Path) -> None:
    secret_file(tmp_path, "chap.key", SECRET + b"\n")
    secret_file(tmp_path, "target.key", TARGET_SECRET)
    iscsi = config_with(tmp_path, MUTUAL).iscsi
    assert load_chap(iscsi) == ChapSecrets("alice", SECRET, "jp-target", TARGET_SECRET)
    assert describe(iscsi) == "mutual CHAP (initiator user 'alice', target user 'jp-target')"


@pytest.mark.parametrize(
    ("chap", "target", "expected"),
    [
        (None, None, r"iscsi\.chap\.secret_file: cannot read .*chap\.key: No such file"),
        (
            (SECRET, 0o644),
            None,
            r"iscsi\.chap\.secret_file: .*chap\.key is readable or writable by others "
            r"\(mode 0644\): chmod 600 it",
        ),
        (
            (b"short\n", 0o600),
            None,
            r"iscsi\.chap\.secret_file: .*chap\.key: CHAP secret is 5 bytes; RFC 7143 wants "
            r"12 to 255 bytes \(e\.g\. `openssl rand -hex 8",
        ),
        ((b"x" * 256, 0o600), None, r"iscsi\.chap\.secret_file: .*CHAP secret is 256 bytes"),
        ((b"x" * 300, 0o600), None, r"iscsi\.chap\.secret_file: .* more than 255 bytes"),
        ((SECRET + b"\nmore\n", 0o600), None, r"iscsi\.chap\.secret_file: .* more than one line"),
        (
            (SECRET, 0o600),
            (b"too-short", 0o600),
            r"iscsi\.chap\.mutual_secret_file: .*mutual CHAP secret is 9 bytes",
        ),
        (
            (SECRET, 0o600),
            (TARGET_SECRET, 0o640),
            r"iscsi\.chap\.mutual_secret_file: .* \(mode 0640\): chmod 600 it",
        ),
        (
            (SECRET, 0o600),
            (SECRET, 0o600),
            r"iscsi\.chap\.mutual_secret_file: the mutual CHAP secret must differ",
        ),
    ],
)
def test_an_unusable_secret_file_names_the_key(
    tmp_path: Path,
    chap: tuple[bytes, int] | None,
    target: tuple[bytes, int] | None,
    expected: str,
) -> None:
    if chap is not None:
        secret_file(tmp_path, "chap.key", *chap)
    if target is not None:
        secret_file(tmp_path, "target.key", *target)
    iscsi = config_with(tmp_path, MUTUAL if target is not None else CHAP).iscsi
    with pytest.raises(ConfigError, match=expected) as info:
        load_chap(iscsi)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("chap", "expected"),
    [
        ("{user: alice}", "iscsi.chap.secret_file: missing"),
        ("{secret_file: chap.key}", "iscsi.chap.user: missing"),
        ("{user: alice, secret: hunter2hunter2}", "iscsi.chap.secret: unknown key"),
        ("{user: '', secret_file: chap.key}", "iscsi.chap.user: bad CHAP user ''"),
        ('{user: "a\\tb", secret_file: chap.key}', "iscsi.chap.user: bad CHAP user"),
        ("{user: 42, secret_file: chap.key}", "iscsi.chap.user: expected a string, got integer"),
        ("{user: alice, secret_file: ''}", "iscsi.chap.secret_file: bad path ''"),
        (
            "{user: alice, secret_file: chap.key, mutual_user: jp-target}",
            "iscsi.chap.mutual_secret_file: missing (iscsi.chap.mutual_user is set: "
            "mutual CHAP needs both)",
        ),
        (
            "{user: alice, secret_file: chap.key, mutual_secret_file: target.key}",
            "iscsi.chap.mutual_user: missing (iscsi.chap.mutual_secret_file is set: "
            "mutual CHAP needs both)",
        ),
        ("alice", "iscsi.chap: expected a mapping, got string"),
    ],
)
def test_chap_key_errors_name_the_key(tmp_path: Path, chap: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_with(tmp_path, f"{{listen: '127.0.0.1:3260', chap: {chap}}}")
    assert str(info.value).startswith(expected), info.value


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "[::]", "target.example"])
def test_iscsi_beyond_loopback_without_chap_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_with(tmp_path, f"{{listen: '{host}:3260'}}")
    assert str(info.value) == (
        f"iscsi.listen: {host}:3260 is not a loopback address and iSCSI has no "
        "authentication: set iscsi.chap (or iscsi.allow_insecure: true on an isolated SAN)"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "[::1]", "localhost"])
def test_iscsi_on_loopback_needs_no_chap(tmp_path: Path, host: str) -> None:
    iscsi = config_with(tmp_path, f"{{listen: '{host}:3260'}}").iscsi
    assert not iscsi.exposed_without_chap


def test_chap_or_allow_insecure_lets_iscsi_listen_beyond_loopback(tmp_path: Path) -> None:
    secret_file(tmp_path, "chap.key", SECRET)
    chap = config_with(tmp_path, CHAP.replace("127.0.0.1", "0.0.0.0")).iscsi
    assert not chap.exposed_without_chap and load_chap(chap) is not None
    insecure = config_with(tmp_path, "{listen: '0.0.0.0:3260', allow_insecure: true}").iscsi
    assert insecure.exposed_without_chap and load_chap(insecure) is None
    assert describe(insecure) == (
        "no authentication on 0.0.0.0:3260, not a loopback address (iscsi.allow_insecure: "
        "true): any host that reaches it can read and write every LUN; set iscsi.chap unless "
        "the network is isolated"
    )
    with pytest.raises(ConfigError, match=r"iscsi\.allow_insecure: expected true or false"):
        config_with(tmp_path, "{listen: '0.0.0.0:3260', allow_insecure: 'yes'}")


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
