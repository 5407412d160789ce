"""The ``link:`` config section and the credentials it names (common.linksecurity)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from common.linksecurity import load_link_security

BASE = """\
role: primary
group: jg0
data_dir: data
listen:
  nbd: 127.0.0.1:10809
  replication: "{replication}"
control: primary.sock
journal: {{capacity: 64MiB}}
volumes:
  - {{name: vol0, path: vol0.img, size: 1MiB}}
"""


def _config(tmp_path: Path, replication: str = "127.0.0.1:7410", link: str = "") -> Path:
    path = tmp_path / "primary.yaml"
    path.write_text(BASE.format(replication=replication) + link)
    return path


def test_no_link_section_means_no_authentication(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    assert not config.link.authenticated
    assert load_link_security(config.link).describe() == "no authentication, no encryption"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "[::]", "primary.example"])
def test_an_unauthenticated_listener_beyond_loopback_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match=r"listen.replication: .* link.allow_insecure"):
        load_config(_config(tmp_path, f"{host}:7410"))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "[::1]", "localhost"])
def test_a_loopback_listener_needs_no_authentication(tmp_path: Path, host: str) -> None:
    assert load_config(_config(tmp_path, f"{host}:7410")).replication_listen is not None


def test_allow_insecure_or_a_secret_lets_it_listen_beyond_loopback(tmp_path: Path) -> None:
    load_config(_config(tmp_path, "0.0.0.0:7410", "link: {allow_insecure: true}\n"))
    secret = tmp_path / "link.key"
    secret.write_text("x" * 32)
    secret.chmod(0o600)
    config = load_config(_config(tmp_path, "0.0.0.0:7410", "link: {secret_file: link.key}\n"))
    assert config.link.secret_file == secret  # relative to the config's directory
    assert load_link_security(config.link).secret == b"x" * 32


@pytest.mark.parametrize(
    ("text", "mode", "words"),
    [
        ("short", 0o600, "holds 5 bytes"),
        ("a-long-enough-secret-but-shared", 0o640, "chmod 600"),
    ],
)
def test_an_unusable_secret_file_names_the_key(
    tmp_path: Path, text: str, mode: int, words: str
) -> None:
    secret = tmp_path / "link.key"
    secret.write_text(text)
    secret.chmod(mode)
    config = load_config(_config(tmp_path, link="link: {secret_file: link.key}\n"))
    with pytest.raises(ConfigError, match=rf"link.secret_file: .*{words}"):
        load_link_security(config.link)


def test_a_missing_secret_file_names_the_key(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, link="link: {secret_file: nowhere.key}\n"))
    with pytest.raises(ConfigError, match=r"link\.secret_file: cannot read"):
        load_link_security(config.link)


def test_tls_needs_all_three_files_and_loads_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"link\.tls\.ca: missing"):
        load_config(_config(tmp_path, link="link: {tls: {cert: a.crt, key: a.key}}\n"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(tmp_path / "a.key"),
         "-out", str(tmp_path / "a.crt"), "-days", "1", "-subj", "/CN=a"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    link = "link: {tls: {cert: a.crt, key: a.key, ca: a.crt}}\n"
    security = load_link_security(load_config(_config(tmp_path, "0.0.0.0:7410", link)).link)
    assert security.server_tls is not None and security.client_tls is not None
    (tmp_path / "a.key").chmod(0o640)
    with pytest.raises(ConfigError, match=r"link\.tls\.key: .* readable .*chmod 600"):
        load_link_security(load_config(_config(tmp_path, link=link)).link)
    (tmp_path / "a.crt").chmod(0o600)
    bad = "link: {tls: {cert: a.crt, key: a.crt, ca: a.crt}}\n"  # a certificate is no key
    with pytest.raises(ConfigError, match=r"link\.tls\.cert/key: cannot load"):
        load_link_security(load_config(_config(tmp_path, link=bad)).link)
