"""The replication link's credentials, loaded from the ``link:`` config section.

    link.secret_file ─► the shared secret (common.replication.auth: HMAC challenge-response)
    link.tls         ─► a server context (the primary's listener) and a client context (the
                        secondary's connection), each presenting this site's certificate and
                        requiring the peer's, signed by link.tls.ca (mutual verification)

Loaded once at start (the daemon refuses to start with a clear line on any problem) and
again by a role switch, from the same files. Host names are not checked: sites are addressed
by IP more often than not, and the CA is the project's own; a peer is who its CA says.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, LinkConfig
from common.replication.auth import SECRET_MIN_BYTES

SECRET_MAX_BYTES = 4096


@dataclass(frozen=True)
class LinkSecurity:
    secret: bytes | None = None
    server_tls: ssl.SSLContext | None = None
    client_tls: ssl.SSLContext | None = None

    def describe(self) -> str:
        parts = []
        if self.server_tls is not None:
            parts.append("TLS with mutual certificate verification")
        if self.secret is not None:
            parts.append("shared-secret authentication")
        return " and ".join(parts) or "no authentication, no encryption"


def load_link_security(link: LinkConfig) -> LinkSecurity:
    """ConfigError (naming the key) when a file is missing, unsafe or unusable."""
    secret = None if link.secret_file is None else _read_secret(link.secret_file)
    if link.tls_cert is None or link.tls_key is None or link.tls_ca is None:
        return LinkSecurity(secret)
    cert, key, ca = link.tls_cert, link.tls_key, link.tls_ca
    check_private_file(key, "link.tls.key")  # the site's identity on the link
    server = tls_context(ssl.Purpose.CLIENT_AUTH, cert, key, ca, section="link.tls")
    client = tls_context(ssl.Purpose.SERVER_AUTH, cert, key, ca, section="link.tls")
    return LinkSecurity(secret, server, client)


def check_private_file(path: Path, key: str) -> None:
    """A secret (a shared secret, a private key) is a regular file only its owner can use."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{key}: {path} is readable or writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
        )


def _read_secret(path: Path) -> bytes:
    key = "link.secret_file"
    check_private_file(path, key)
    try:
        with path.open("rb") as f:
            secret = f.read(SECRET_MAX_BYTES + 1).strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not SECRET_MIN_BYTES <= len(secret) <= SECRET_MAX_BYTES:
        raise ConfigError(
            f"{key}: {path} holds {len(secret)} bytes; a secret has "
            f"{SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return secret


def tls_context(
    purpose: ssl.Purpose, cert: Path, key: Path, ca: Path | None, *, section: str
) -> ssl.SSLContext:
    """A TLS 1.2+ context presenting `cert`; with `ca`, the peer must present a certificate
    signed by it. ConfigError names the keys under `section` (``link.tls``, ``nbd.tls``)."""
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    # A server asks for the client's certificate too; without a CA it asks for none.
    context.verify_mode = ssl.CERT_NONE if ca is None else ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}.cert/key: cannot load {cert} with {key}: {exc}") from None
    if ca is None:
        return context
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}.ca: cannot load {ca}: {exc}") from None
    return context
