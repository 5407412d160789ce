"""The replication link, authenticated and encrypted, with real daemons on 127.0.0.1.

Shared secret (HMAC challenge-response): the same secret pairs and replicates; a wrong one,
or one on a single site, is refused with a reason on both sides. TLS with mutual
verification: certificates from one CA pair; a certificate from another CA, or a plaintext
secondary, is refused. A replication listener beyond loopback without either is refused at
start-up unless link.allow_insecure.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    create_pair,
    display,
    pairctl,
    qemu_io,
    run_daemon_to_exit,
    volumes_equal,
    wait_caught_up,
    wait_until,
)


def _secret(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def _start(
    daemons: Daemons,
    primary_link: Mapping[str, Any] | None,
    secondary_link: Mapping[str, Any] | None,
) -> tuple[Daemon, Daemon]:
    primary = daemons.prepare("primary", link=primary_link)
    primary.start()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port, link=secondary_link)
    secondary.start()
    return primary, secondary


def _link_why(secondary: Daemon, words: str) -> str:
    """Wait until the secondary's display says why the link is down, containing `words`."""
    wait_until(
        lambda: words in display(secondary)["link"]["why"],
        timeout_s=20,
        what=f"link.why to say {words!r}",
    )
    return str(display(secondary)["link"]["why"])


def _replicates(primary: Daemon, secondary: Daemon) -> None:
    create_pair(primary, secondary)
    qemu_io(primary.uri(), "write -P 0x6b 1M 3M")
    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)


def test_the_same_secret_on_both_sites_pairs_and_replicates(
    daemons: Daemons, tmp_path: Path
) -> None:
    secret = _secret(tmp_path / "link.key", "a7f3c9e1d2b4a6f8e0c1d3b5a7f9e2c4")
    primary, secondary = _start(daemons, {"secret_file": secret}, {"secret_file": secret})
    _replicates(primary, secondary)
    assert "authenticated" in primary.log_text()
    assert "shared-secret authentication" in secondary.log_text()


def test_a_wrong_secret_is_refused_and_logged_on_both_sides(
    daemons: Daemons, tmp_path: Path
) -> None:
    primary, secondary = _start(
        daemons,
        {"secret_file": _secret(tmp_path / "p.key", "the-primary-secret-0123456789")},
        {"secret_file": _secret(tmp_path / "s.key", "another-secret-9876543210abc")},
    )
    why = _link_why(secondary, "authentication failed")
    assert "wrong shared secret" in why or "closed the link" in why
    wait_until(
        lambda: "wrong shared secret" in primary.log_text(),
        timeout_s=10,
        what="the primary to log the refusal",
    )
    assert not display(primary)["link"]["up"]
    refused = pairctl(primary, "create", check=False)
    assert refused.returncode != 0  # no authenticated secondary to pair with


def test_a_secret_on_one_site_only_is_refused_with_the_reason(
    daemons: Daemons, tmp_path: Path
) -> None:
    secret = _secret(tmp_path / "link.key", "only-one-site-has-this-secret-42")
    primary, secondary = _start(daemons, {"secret_file": secret}, None)
    _link_why(secondary, "the primary requires authentication")
    wait_until(
        lambda: "no authentication response" in primary.log_text(),
        timeout_s=10,
        what="the primary to log the refusal",
    )
    secondary.stop()
    primary.stop()

    other = daemons.prepare("primary", name="primary2")
    other.start()
    lone = daemons.prepare(
        "secondary", name="secondary2", primary_port=other.peer_port, link={"secret_file": secret}
    )
    lone.start()
    _link_why(lone, "no challenge from the primary")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}")  # fmt: skip
    return key, cert


def _site_cert(directory: Path, name: str, ca: tuple[Path, Path]) -> dict[str, str]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-out", str(cert), "-days", "2")  # fmt: skip
    return {"cert": str(cert), "key": str(key), "ca": str(ca[1])}


def test_tls_with_certificates_from_one_ca_pairs_and_replicates(
    daemons: Daemons, tmp_path: Path
) -> None:
    ca = _ca(tmp_path, "ca")
    primary, secondary = _start(
        daemons,
        {"tls": _site_cert(tmp_path, "site-a", ca)},
        {"tls": _site_cert(tmp_path, "site-b", ca)},
    )
    _replicates(primary, secondary)
    assert "TLS with mutual certificate verification" in primary.log_text()


def test_tls_refuses_another_cas_certificate_and_a_plaintext_secondary(
    daemons: Daemons, tmp_path: Path
) -> None:
    ca, rogue_ca = _ca(tmp_path, "ca"), _ca(tmp_path, "rogue-ca")
    primary = daemons.prepare("primary", link={"tls": _site_cert(tmp_path, "site-a", ca)})
    primary.start()
    rogue = _site_cert(tmp_path, "rogue", rogue_ca) | {"ca": str(ca[1])}  # trusts our CA
    impostor = daemons.prepare(
        "secondary", name="impostor", primary_port=primary.peer_port, link={"tls": rogue}
    )
    impostor.start()
    _link_why(impostor, "unknown ca")  # the primary's TLS alert
    wait_until(
        lambda: "TLS handshake failed" in primary.log_text(),
        timeout_s=10,
        what="the primary to log the refused certificate",
    )
    assert not display(primary)["link"]["up"]
    impostor.stop()

    refusals = primary.log_text().count("TLS handshake failed")
    plaintext = daemons.prepare("secondary", name="plain", primary_port=primary.peer_port)
    plaintext.start()
    _link_why(plaintext, "does it require link.tls?")
    wait_until(
        lambda: primary.log_text().count("TLS handshake failed") > refusals,
        timeout_s=20,
        what="the primary to log the plaintext secondary's refusal",
    )
    assert not display(primary)["link"]["up"]
    assert pairctl(primary, "create", check=False).returncode != 0


def test_an_unauthenticated_listener_beyond_loopback_is_refused_at_start(
    daemons: Daemons, tmp_path: Path
) -> None:
    primary = daemons.prepare("primary")
    text = primary.config_path.read_text()
    exposed = text.replace("  replication: 127.0.0.1:", "  replication: 0.0.0.0:")
    assert exposed != text
    primary.config_path.write_text(exposed)
    done = run_daemon_to_exit("primary", primary.config_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "listen.replication" in lines[0] and "link.allow_insecure" in lines[0]
    primary.config_path.write_text(exposed + "link: {allow_insecure: true}\n")
    primary.start()  # explicitly overridden: it starts


def test_a_secret_file_readable_by_others_is_refused_at_start(
    daemons: Daemons, tmp_path: Path
) -> None:
    secret = tmp_path / "link.key"
    secret.write_text("a-perfectly-long-secret-but-world-readable\n")
    secret.chmod(0o644)
    primary = daemons.prepare("primary", link={"secret_file": str(secret)})
    done = run_daemon_to_exit("primary", primary.config_path)
    assert done.returncode == 2
    assert "link.secret_file" in done.stderr and "chmod 600" in done.stderr
