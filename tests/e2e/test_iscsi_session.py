"""Session-level iSCSI features against the standalone target with real initiators: CHAP
(libiscsi's iscsi-ls/iscsi-inq, qemu-io), NOP-In pings (qemu-io idle; a raw socket that
stops answering), and libiscsi's conformance tests for TMF, DataSN and residuals."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest

from common.iscsi.pdu import (
    BHS_BYTES,
    RESERVED_TAG,
    Op,
    Pdu,
    decode_bhs,
    encode_pdu,
    pack_fields,
    pad4,
)
from tests.e2e.helpers import HOST, MiB, read_at, run, wait_until
from tests.e2e.test_iscsi_initiators import IQN, qemu_io, start_target, stop_target
from tests.unit.test_iscsi_core import login_pdu

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

USER, SECRET = "alice", "s3cret-of-16byte"
TARGET_USER, TARGET_SECRET = "jp-target", "another-16-bytes"


def test_chap_logins_pass_with_the_secret_and_fail_without_it(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "target-secret").write_text(TARGET_SECRET + "\n")
    target = start_target(
        tmp_path,
        *("--chap-user", USER, "--chap-secret-file", str(tmp_path / "secret")),
        *("--chap-mutual-user", TARGET_USER),
        *("--chap-mutual-secret-file", str(tmp_path / "target-secret")),
    )
    portal = f"{USER}%{SECRET}@{target.portal}"  # libiscsi: iscsi://user%secret@host
    try:
        out = run(["iscsi-ls", "-s", f"iscsi://{portal}"], timeout=30).stdout
        assert f"Target:{IQN}" in out and "Lun:0" in out  # discovery and normal, both CHAP
        qemu_io(f"iscsi://{portal}/{IQN}/0", "write -P 0x6b 4k 64k", "read -P 0x6b 4k 64k")
        assert read_at(target.lun_path, 4096, 65536) == b"\x6b" * 65536
        # mutual CHAP: libiscsi checks the target's answer to its own challenge
        assert iscsi_inq_mutual(f"iscsi://{portal}/{IQN}/0", TARGET_SECRET).returncode == 0
        wrong = iscsi_inq_mutual(f"iscsi://{portal}/{IQN}/0", "not-the-target-secret")
        assert wrong.returncode != 0 and "Invalid CHAP_R response from the target" in wrong.stderr
        for url in (f"iscsi://{USER}%wrong-secret-123@{target.portal}", f"iscsi://{target.portal}"):
            refused = run(["iscsi-ls", "-s", url], check=False, timeout=30)
            assert refused.returncode != 0
            assert "Authentication failure" in refused.stdout + refused.stderr
        wait_until(
            lambda: "wrong user or response" in target.log() and "CHAP is required" in target.log(),
            10.0,
            "both refusals logged with their reason",
        )
    finally:
        stop_target(target)


def test_qemu_io_sends_unsolicited_data_out_when_initial_r2t_is_no(tmp_path: Path) -> None:
    """libiscsi asks InitialR2T=No; with our MaxRecvDataSegmentLength (8 KiB) below the
    FirstBurstLength (256 KiB) a write goes as 8 KiB immediate data, unsolicited Data-Out
    up to 256 KiB, then R2Ts for the rest."""
    target = start_target(tmp_path, "--max-recv-data-segment-length", "8192")
    try:
        qemu_io(target.lun_url, "write -P 0x71 64k 1M", "read -P 0x71 64k 1M")
        assert read_at(target.lun_path, 65536, MiB) == b"\x71" * MiB
        assert "InitialR2T False" in target.log()
    finally:
        stop_target(target)


def iscsi_inq_mutual(url: str, target_secret: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["LIBISCSI_CHAP_TARGET_USERNAME"] = TARGET_USER
    env["LIBISCSI_CHAP_TARGET_PASSWORD"] = target_secret
    return subprocess.run(
        ["iscsi-inq", url], capture_output=True, text=True, env=env, timeout=30, check=False
    )


def read_pdu(sock: socket.socket) -> Pdu | None:
    """One target PDU (no digests), or None when the target closed the connection."""
    header = recv_exactly(sock, BHS_BYTES)
    if header is None:
        return None
    pdu, ahs, length = decode_bhs(header)
    rest = recv_exactly(sock, ahs + length + pad4(length))
    assert rest is not None, "connection closed inside a PDU"
    pdu.data = rest[ahs : ahs + length]
    return pdu


def recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def test_an_initiator_that_stops_answering_nop_in_is_dropped(tmp_path: Path) -> None:
    target = start_target(tmp_path, "--nop-in-interval", "0.3", "--nop-in-timeout", "0.6")
    try:
        # libiscsi answers the pings while qemu-io idles past several timeouts
        qemu_io(target.lun_url, "write -P 0x2d 0 4k", "sleep 1500", "read -P 0x2d 0 4k")
        assert "dropped:" not in target.log()
        with socket.create_connection((HOST, target.port), timeout=10) as sock:
            names = [("InitiatorName", "iqn.2026-01.org.example:mute"), ("TargetName", IQN)]
            keys = [*names, ("SessionType", "Normal"), ("MaxRecvDataSegmentLength", "8192")]
            sock.sendall(encode_pdu(login_pdu(keys, 1, 3)))
            response = read_pdu(sock)
            assert response is not None and response.opcode == Op.LOGIN_RSP
            assert response.opcode_specific[16:18] == b"\0\0"
            ping = read_pdu(sock)  # the initiator has been silent: a NOP-In asks for a reply
            assert ping is not None and ping.opcode == Op.NOP_IN and ping.itt == RESERVED_TAG
            answer = Pdu(
                Op.NOP_OUT,
                flags=0x80,
                immediate=True,
                itt=RESERVED_TAG,
                opcode_specific=pack_fields(ping.field32(20), 50, 0, 0, 0, 0, 0),
            )
            sock.sendall(encode_pdu(answer))
            second = read_pdu(sock)  # answered: the connection stays, the next ping comes
            assert second is not None and second.opcode == Op.NOP_IN
            assert read_pdu(sock) is None  # not answered: dropped
        wait_until(lambda: "no NOP-Out answered" in target.log(), 10.0, "the drop logged")
        assert re.search(r"dropped: .*NOP-In ping .* 0\.6 s", target.log())
    finally:
        stop_target(target)


MUST_PASS = {
    "iSCSI.iSCSITMF": ["AbortTaskSimpleAsync", "LUNResetSimpleAsync"],
    "iSCSI.iSCSIdatasn": ["iSCSIDataSnInvalid"],
    "iSCSI.iSCSIResiduals": [
        "Read10Invalid",
        "Read10Residuals",
        "Read16Residuals",
        "Write10Residuals",
        "Write16Residuals",
    ],
}


def test_libiscsi_conformance_for_tmf_datasn_and_residuals(tmp_path: Path) -> None:
    """Each test named above runs and passes, not skipped (CUnit counts a skip as a pass:
    skips are read from the verbose output); the families' other tests need READ12,
    WRITE12 or WRITE AND VERIFY, which this target does not implement."""
    target = start_target(tmp_path)
    try:
        for family, names in MUST_PASS.items():
            argv = ["iscsi-test-cu", "--dataloss", "-x", "-t", family, target.lun_url]
            run(argv, timeout=60, cwd=tmp_path)  # -x: CUnitAutomated-Results.xml in cwd
            passed, failed = cunit_results(tmp_path / "CUnitAutomated-Results.xml")
            assert set(names) <= passed and not failed, (family, passed, failed)
            verbose = run(argv[:2] + argv[3:], timeout=60, cwd=tmp_path).stdout
            for name in names:
                segment = verbose.split(f"Test: {name} ...", 1)[1].split("Test: ", 1)[0]
                assert "[SKIPPED]" not in segment.rsplit("passed", 1)[0], (name, segment)
    finally:
        stop_target(target)


def cunit_results(path: Path) -> tuple[set[str], set[str]]:
    root = ElementTree.parse(path).getroot()

    def names(tag: str) -> set[str]:
        return {(element.findtext("TEST_NAME") or "").strip() for element in root.iter(tag)}

    return names("CUNIT_RUN_TEST_SUCCESS"), names("CUNIT_RUN_TEST_FAILURE")
