"""CHAP from the daemons' config (iscsi.chap), with real initiators against primaryd and
secondaryd.

    secret file mode 0644 ─► primaryd exits 2, one line naming iscsi.chap.secret_file
    chmod 600 ─► primaryd starts, logs "iSCSI: mutual CHAP (...)"
      iscsi-ls / qemu-io / iscsi-inq (mutual) with the secrets ─► served
      a wrong secret, no credentials ─► Authentication failure; WARNING in the daemon's log
    secondaryd with the same section ─► its LUNs need CHAP too
    0.0.0.0 without CHAP ─► refused (exit 2); with iscsi.allow_insecure ─► a WARNING at start
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import (
    HOST,
    Daemon,
    Daemons,
    MiB,
    free_port,
    read_at,
    run,
    run_daemon_to_exit,
    tcp_accepts,
    wait_until,
)
from tests.e2e.test_iscsi_initiators import qemu_io
from tests.e2e.test_iscsi_session import iscsi_inq_mutual

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

VOLUMES = (("vol0", 4 * MiB),)
IQN = "iqn.2026-01.org.journalpair:jg0"
USER, SECRET = "alice", "s3cret-of-16byte"
TARGET_USER, TARGET_SECRET = "jp-target", "another-16-bytes"


def prepare_with_chap(daemons: Daemons, role: str, secrets: Path) -> Daemon:
    daemon = daemons.prepare(role, VOLUMES)
    port = free_port()
    chap = (
        f"{{user: {USER}, secret_file: {secrets / 'chap.key'}, mutual_user: {TARGET_USER}, "
        f"mutual_secret_file: {secrets / 'target.key'}}}"
    )
    with daemon.config_path.open("a") as config:
        config.write(f"iscsi: {{listen: '{HOST}:{port}', chap: {chap}}}\n")
    daemon.iscsi_port = port  # type: ignore[attr-defined]
    return daemon


def portal(daemon: Daemon, credentials: str = f"{USER}%{SECRET}@") -> str:
    return f"iscsi://{credentials}{HOST}:{daemon.iscsi_port}"  # type: ignore[attr-defined]


def start(daemon: Daemon) -> None:
    daemon.start()
    port = daemon.iscsi_port  # type: ignore[attr-defined]
    wait_until(lambda: tcp_accepts(port), 15, f"{daemon.name}'s iSCSI port")


def refused(url: str) -> bool:
    done = run(["iscsi-ls", "-s", url], check=False, timeout=30)
    return done.returncode != 0 and "Authentication failure" in done.stdout + done.stderr


def test_daemons_require_chap_from_their_config(daemons: Daemons, tmp_path: Path) -> None:
    (tmp_path / "chap.key").write_text(SECRET + "\n")
    (tmp_path / "chap.key").chmod(0o644)
    (tmp_path / "target.key").write_text(TARGET_SECRET + "\n")
    (tmp_path / "target.key").chmod(0o600)
    primary = prepare_with_chap(daemons, "primary", tmp_path)
    done = run_daemon_to_exit("primary", primary.config_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("primaryd: config error: iscsi.chap.secret_file: "), done.stderr
    assert "(mode 0644): chmod 600 it" in done.stderr, done.stderr

    (tmp_path / "chap.key").chmod(0o600)
    start(primary)
    assert f"iSCSI: mutual CHAP (initiator user '{USER}', target user '{TARGET_USER}')" in (
        primary.log_text()
    )
    out = run(["iscsi-ls", "-s", portal(primary)], timeout=30).stdout
    assert f"Target:{IQN}" in out and "Lun:0" in out, out  # discovery and normal logins
    qemu_io(f"{portal(primary)}/{IQN}/0", "write -P 0x3c 8k 64k", "read -P 0x3c 8k 64k")
    assert read_at(primary.volume("vol0").path, 8192, 65536) == b"\x3c" * 65536
    assert iscsi_inq_mutual(f"{portal(primary)}/{IQN}/0", TARGET_SECRET).returncode == 0
    assert refused(portal(primary, f"{USER}%wrong-secret-123@"))
    assert refused(portal(primary, ""))
    wait_until(
        lambda: primary.log_text().count("WARNING journalpair.iscsi: initiator") == 2,
        10,
        "both failed logins logged as warnings",
    )
    log = primary.log_text()
    assert "failed authentication, login refused: CHAP user 'alice': wrong user or response" in log
    assert "failed authentication, login refused: CHAP is required: no security stage" in log

    secondary = prepare_with_chap(daemons, "secondary", tmp_path)
    start(secondary)
    assert f"iSCSI: mutual CHAP (initiator user '{USER}'" in secondary.log_text()
    assert f"Target:{IQN}" in run(["iscsi-ls", "-s", portal(secondary)], timeout=30).stdout
    assert refused(portal(secondary, ""))


def test_iscsi_beyond_loopback_needs_chap_or_allow_insecure(daemons: Daemons) -> None:
    daemon = daemons.prepare("secondary", VOLUMES)
    port = free_port()
    config = daemon.config_path.read_text()
    daemon.config_path.write_text(config + f"iscsi: {{listen: '0.0.0.0:{port}'}}\n")
    done = run_daemon_to_exit("secondary", daemon.config_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"secondaryd: config error: iscsi.listen: 0.0.0.0:{port} is not a loopback address "
        "and iSCSI has no authentication: set iscsi.chap (or iscsi.allow_insecure: true on an "
        "isolated SAN)\n"
    )
    insecure = f"iscsi: {{listen: '0.0.0.0:{port}', allow_insecure: true}}\n"
    daemon.config_path.write_text(config + insecure)
    daemon.iscsi_port = port  # type: ignore[attr-defined]
    start(daemon)
    assert (
        f"WARNING journalpair: iSCSI: no authentication on 0.0.0.0:{port}, not a loopback "
        "address (iscsi.allow_insecure: true): any host that reaches it can read and write "
        "every LUN" in daemon.log_text()
    ), daemon.log_tail()
    assert f"Target:{IQN}" in run(["iscsi-ls", "-s", portal(daemon, "")], timeout=30).stdout
