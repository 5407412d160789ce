"""TLS for the NBD exports, from the ``nbd.tls`` config section.

    nbd.tls.cert + key ─► the server context every STARTTLS handshake uses
    nbd.tls.ca (opt.)  ─► clients must present a certificate signed by it (else none is asked)
    nbd.tls.mode       ─► require (the spec's FORCEDTLS) or optional (a client may stay plain)

Loaded at start (the daemon refuses to start with one clear line on any problem) and again
by each role's service, from the same files. Host names are not checked on client
certificates: who may connect is whoever the CA signed.

handshake_failure_cause() turns the ssl error of a failed handshake into the likely reason,
for the operator reading the log.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from common.config import ConfigError, NbdConfig
from common.linksecurity import check_private_file, tls_context
from common.nbd.protocol import TlsMode


def load_nbd_tls(nbd: NbdConfig) -> ssl.SSLContext | None:
    """The server context, or None when nbd.tls is not configured. ConfigError names the
    key when a file is missing, unreadable, unsafe or unusable."""
    if nbd.tls_cert is None or nbd.tls_key is None:
        return None
    _check_readable(nbd.tls_cert, "nbd.tls.cert")
    check_private_file(nbd.tls_key, "nbd.tls.key")
    _check_readable(nbd.tls_key, "nbd.tls.key")
    if nbd.tls_ca is not None:
        _check_readable(nbd.tls_ca, "nbd.tls.ca")
    return tls_context(
        ssl.Purpose.CLIENT_AUTH, nbd.tls_cert, nbd.tls_key, nbd.tls_ca, section="nbd.tls"
    )


def nbd_tls_mode(nbd: NbdConfig) -> TlsMode:
    if not nbd.tls:
        return TlsMode.OFF
    return TlsMode.REQUIRE if nbd.tls_mode == "require" else TlsMode.OPTIONAL


def describe(nbd: NbdConfig) -> str:
    if not nbd.tls:
        return "no TLS"
    who = "clients need a certificate from nbd.tls.ca" if nbd.tls_ca else "no client certificate"
    return f"TLS {nbd.tls_mode} ({who})"


def _check_readable(path: Path, key: str) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


# ssl error reasons (OpenSSL's names) -> what an operator should check.
_CAUSES = {
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate is not signed by nbd.tls.ca",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "the client presented no certificate (nbd.tls.ca is set, so one is required)"
    ),
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this server's certificate (its CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected this server's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (
        "the client rejected this server's certificate (its CA, or the host name or IP "
        "address it connected to is not in the certificate)"
    ),
    "WRONG_VERSION_NUMBER": "the client did not speak TLS after NBD_OPT_STARTTLS",
    "HTTP_REQUEST": "the client did not speak TLS after NBD_OPT_STARTTLS",
    "UNKNOWN_PROTOCOL": "the client did not speak TLS after NBD_OPT_STARTTLS",
    "RECORD_LAYER_FAILURE": "the client did not speak TLS after NBD_OPT_STARTTLS",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (1.2 or later is required)",
    "NO_SHARED_CIPHER": "no cipher in common with the client",
}


def handshake_failure_cause(exc: ssl.SSLError) -> str:
    return _CAUSES.get(str(exc.reason), "see the TLS error")
