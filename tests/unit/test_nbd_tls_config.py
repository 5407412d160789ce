"""The ``nbd.tls`` config keys and the server context they load (common.nbd.tls)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from common.nbd.protocol import TlsMode
from common.nbd.tls import load_nbd_tls, nbd_tls_mode

pytestmark = pytest.mark.timeout(60)

BASE = """\
role: primary
group: jg0
data_dir: data
listen: {nbd: "127.0.0.1:10809", replication: "127.0.0.1:7410"}
control: primary.sock
journal: {capacity: 64MiB}
volumes:
  - {name: vol0, path: vol0.img, size: 1MiB}
"""


def _config(tmp_path: Path, nbd: str = "") -> Path:
    path = tmp_path / "primary.yaml"
    path.write_text(BASE + nbd)
    return path


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """server.crt/server.key (self-signed, so it is its own CA) in tmp_path."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(tmp_path / "server.key"),
         "-out", str(tmp_path / "server.crt"), "-days", "1", "-subj", "/CN=server"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    (tmp_path / "server.key").chmod(0o600)
    return tmp_path


def test_no_nbd_section_means_no_tls(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    assert load_nbd_tls(config.nbd) is None
    assert nbd_tls_mode(config.nbd) is TlsMode.OFF


def test_mode_defaults_to_require_and_ca_is_optional(certs: Path) -> None:
    config = load_config(_config(certs, "nbd: {tls: {cert: server.crt, key: server.key}}\n"))
    assert config.nbd.tls_cert == certs / "server.crt"  # relative to the config's directory
    assert nbd_tls_mode(config.nbd) is TlsMode.REQUIRE
    context = load_nbd_tls(config.nbd)
    assert context is not None and context.verify_mode is ssl.CERT_NONE
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2


def test_a_ca_makes_client_certificates_required(certs: Path) -> None:
    nbd = "nbd: {tls: {cert: server.crt, key: server.key, ca: server.crt, mode: optional}}\n"
    config = load_config(_config(certs, nbd))
    assert nbd_tls_mode(config.nbd) is TlsMode.OPTIONAL
    context = load_nbd_tls(config.nbd)
    assert context is not None and context.verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("tls", "words"),
    [
        ("{cert: server.crt, key: server.key, mode: always}", r"nbd\.tls\.mode: must be require"),
        ("{cert: server.crt}", r"nbd\.tls\.key: missing"),
        ("{cert: server.crt, key: server.key, ciphers: x}", r"nbd\.tls\.ciphers: unknown key"),
        ("[server.crt]", r"nbd\.tls: expected a mapping"),
    ],
)
def test_bad_nbd_tls_keys_name_the_key(tmp_path: Path, tls: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(_config(tmp_path, f"nbd: {{tls: {tls}}}\n"))


def test_unusable_files_name_the_key(certs: Path) -> None:
    def refused(tls: str, words: str) -> None:
        config = load_config(_config(certs, f"nbd: {{tls: {tls}}}\n"))
        with pytest.raises(ConfigError, match=words):
            load_nbd_tls(config.nbd)

    refused("{cert: nowhere.crt, key: server.key}", r"nbd\.tls\.cert: cannot read .*nowhere")
    refused("{cert: server.crt, key: nowhere.key}", r"nbd\.tls\.key: cannot read")
    refused("{cert: server.crt, key: server.key, ca: nowhere.crt}", r"nbd\.tls\.ca: cannot read")
    refused("{cert: server.crt, key: server.crt}", r"nbd\.tls\.key: .* readable .*chmod 600")
    (certs / "copy.crt").write_bytes((certs / "server.crt").read_bytes())
    (certs / "copy.crt").chmod(0o600)
    refused("{cert: server.crt, key: copy.crt}", r"nbd\.tls\.cert/key: cannot load")
    refused("{cert: server.crt, key: server.key, ca: server.key}", r"nbd\.tls\.ca: cannot load")
    (certs / "server.key").chmod(0o640)
    refused("{cert: server.crt, key: server.key}", r"nbd\.tls\.key: .*mode 0640.*chmod 600")
