"""The iSCSI target's CHAP credentials, loaded from the ``iscsi.chap`` config section.

    iscsi.chap.user + secret_file                ─► ChapSecrets: every login must pass CHAP
    iscsi.chap.mutual_user + mutual_secret_file  ─► what the target answers an initiator that
                                                    challenges it back (mutual CHAP)

A secret file is like link.secret_file: a regular file of mode 0600 holding one line (its
line ending dropped), 12 to 255 bytes (RFC 7143 12.1.3; common.iscsi.chap checks it).
Loaded at start, where the daemon refuses to start with one line naming the key, and again
by each role's service for its IscsiServer, from the same files.
"""

from __future__ import annotations

from pathlib import Path

from common.config import ConfigError, IscsiConfig
from common.iscsi.chap import MAX_SECRET_BYTES, ChapSecrets, check_secret
from common.linksecurity import check_private_file


def load_chap(iscsi: IscsiConfig) -> ChapSecrets | None:
    """The CHAP secrets, or None when iscsi.chap is not configured. ConfigError names the
    key when a file is missing, unsafe, or holds an unusable secret."""
    if iscsi.chap_user is None or iscsi.chap_secret_file is None:
        return None
    secret = _read_secret(iscsi.chap_secret_file, "iscsi.chap.secret_file", "CHAP secret")
    mutual_secret = None
    if iscsi.chap_mutual_secret_file is not None:
        mutual_secret = _read_secret(
            iscsi.chap_mutual_secret_file, "iscsi.chap.mutual_secret_file", "mutual CHAP secret"
        )
    try:
        return ChapSecrets(iscsi.chap_user, secret, iscsi.chap_mutual_user, mutual_secret)
    except ValueError as exc:  # the same secret both ways: a reflection risk
        raise ConfigError(f"iscsi.chap.mutual_secret_file: {exc}") from None


def describe(iscsi: IscsiConfig) -> str:
    """Which authentication the target asks for, for the start-up log."""
    if iscsi.chap_user is not None:
        if iscsi.chap_mutual_user is not None:
            return (
                f"mutual CHAP (initiator user {iscsi.chap_user!r}, "
                f"target user {iscsi.chap_mutual_user!r})"
            )
        return f"CHAP (initiator user {iscsi.chap_user!r})"
    if iscsi.exposed_without_chap:
        return (
            f"no authentication on {iscsi.listen}, not a loopback address "
            "(iscsi.allow_insecure: true): any host that reaches it can read and write "
            "every LUN; set iscsi.chap unless the network is isolated"
        )
    return "no authentication (loopback only)"


def _read_secret(path: Path, key: str, what: str) -> bytes:
    check_private_file(path, key)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SECRET_BYTES + 3)  # room for a line ending, and one more
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_BYTES + 2:
        raise ConfigError(f"{key}: {path} holds more than {MAX_SECRET_BYTES} bytes")
    secret = data.removesuffix(b"\n").removesuffix(b"\r")
    if b"\n" in secret or b"\r" in secret:
        raise ConfigError(f"{key}: {path} holds more than one line; a secret is one line")
    try:
        check_secret(what, secret)
    except ValueError as exc:
        raise ConfigError(
            f"{key}: {path}: {exc} (e.g. `openssl rand -hex 8 > {path.name}`: 16 characters)"
        ) from None
    return secret
