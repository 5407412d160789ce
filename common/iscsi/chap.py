"""CHAP for the iSCSI login's security stage (RFC 7143 12.1.3, RFC 1994), sans-I/O.

    initiator                                   target (ChapAuthenticator)
    AuthMethod=CHAP,None        ───────────►    AuthMethod=CHAP           (target.py)
    CHAP_A=5                    ───────────►    challenge(): CHAP_A=5 CHAP_I=<random id>
                                                             CHAP_C=0x<16 random bytes>
    CHAP_N=user CHAP_R=0x<MD5(I|secret|C)>
      [CHAP_I=i CHAP_C=0x<c>: mutual]  ────►    verify(): user and response checked
                                        ◄───    [CHAP_N=mutual user
                                                 CHAP_R=0x<MD5(i|mutual secret|c)>]

One authenticator serves one login: it issues one challenge and checks one response, so a
response recorded from another login (another challenge) never passes. Only MD5 (CHAP_A=5).
Everything an initiator gets wrong raises ChapError (the login answers "authentication
failure"); a bad configuration raises ValueError before anything is served.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

CHAP_MD5 = "5"
MIN_SECRET_BYTES = 12  # RFC 7143 12.1.3: shorter secrets MUST be refused
MAX_SECRET_BYTES = 255
CHALLENGE_BYTES = 16
MAX_CHALLENGE_BYTES = 1024  # an initiator's challenge for mutual CHAP, decoded
MAX_NAME_CHARS = 255


class ChapError(Exception):
    """The initiator failed (or broke) the CHAP exchange."""


@dataclass(frozen=True, slots=True)
class ChapSecrets:
    """The initiator's user and secret; for mutual CHAP, the target's own user and secret
    (what the target answers when the initiator challenges it)."""

    user: str
    secret: bytes
    mutual_user: str | None = None
    mutual_secret: bytes | None = None

    def __post_init__(self) -> None:
        if not self.user or len(self.user) > MAX_NAME_CHARS:
            raise ValueError("CHAP user must be 1..255 characters")
        check_secret("CHAP secret", self.secret)
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise ValueError("mutual CHAP needs both a user and a secret")
        if self.mutual_secret is not None:
            check_secret("mutual CHAP secret", self.mutual_secret)
            if hmac.compare_digest(self.mutual_secret, self.secret):
                # with one secret both ways, a target's answer could be reflected back
                raise ValueError("the mutual CHAP secret must differ from the CHAP secret")


def check_secret(what: str, secret: bytes) -> None:
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"{what} is {len(secret)} bytes; RFC 7143 wants {MIN_SECRET_BYTES} to "
            f"{MAX_SECRET_BYTES} bytes"
        )


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994: MD5 over the identifier octet, the secret and the challenge."""
    return hashlib.md5(bytes((identifier,)) + secret + challenge, usedforsecurity=False).digest()


def encode_binary(data: bytes) -> str:
    return "0x" + data.hex()


def decode_binary(key: str, value: str, max_bytes: int) -> bytes:
    """A binary value, hex (0x) or base64 (0b) (RFC 7143 6.1), of at most max_bytes."""
    if len(value) > 2 + 2 * max_bytes:
        raise ChapError(f"{key} longer than {max_bytes} bytes")
    prefix, digits = value[:2].lower(), value[2:]
    try:
        if prefix == "0x":
            decoded = bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
        elif prefix == "0b":
            decoded = base64.b64decode(digits, validate=True)
        else:
            raise ChapError(f"{key} is not 0x hex or 0b base64")
    except (ValueError, binascii.Error) as exc:
        raise ChapError(f"{key}: malformed binary value") from exc
    if not decoded or len(decoded) > max_bytes:
        raise ChapError(f"{key}: {len(decoded)} bytes")
    return decoded


class ChapAuthenticator:
    """The target's side of one CHAP exchange (one login)."""

    def __init__(
        self, secrets: ChapSecrets, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        self.secrets = secrets
        self._random_bytes = random_bytes
        self._challenge: tuple[int, bytes] | None = None
        self._done = False

    def challenge(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Answer CHAP_A with the algorithm, an identifier and a challenge."""
        if self._challenge is not None or self._done:
            raise ChapError("CHAP_A sent twice")
        algorithms = [item.strip() for item in keys.get("CHAP_A", "").split(",")]
        if CHAP_MD5 not in algorithms:
            raise ChapError(f"CHAP_A={keys.get('CHAP_A', '')[:32]}: only 5 (MD5) here")
        identifier = self._random_bytes(1)[0]
        challenge = self._random_bytes(CHALLENGE_BYTES)
        self._challenge = (identifier, challenge)
        return [
            ("CHAP_A", CHAP_MD5),
            ("CHAP_I", str(identifier)),
            ("CHAP_C", encode_binary(challenge)),
        ]

    def verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Check CHAP_N/CHAP_R; answer the initiator's own challenge for mutual CHAP."""
        if self._challenge is None or self._done:
            raise ChapError("CHAP_R without a challenge of ours (or a second CHAP_R)")
        identifier, challenge = self._challenge
        self._done = True  # one try: a wrong answer is not retried on this login
        user, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if user is None or response is None:
            raise ChapError("CHAP_N and CHAP_R are both needed")
        expected = chap_response(identifier, self.secrets.secret, challenge)
        got = decode_binary("CHAP_R", response, len(expected))
        user_ok = hmac.compare_digest(user.encode(), self.secrets.user.encode())
        if not (hmac.compare_digest(got, expected) and user_ok):
            raise ChapError(f"CHAP user {user[:64]!r}: wrong user or response")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        return self._answer_mutual(keys, challenge)

    def _answer_mutual(self, keys: dict[str, str], our_challenge: bytes) -> list[tuple[str, str]]:
        if self.secrets.mutual_user is None or self.secrets.mutual_secret is None:
            raise ChapError("the initiator asks for mutual CHAP; no target secret is set")
        try:
            identifier = int(keys.get("CHAP_I", ""), 0)
        except ValueError as exc:
            raise ChapError("CHAP_I is not a number") from exc
        if not 0 <= identifier <= 255:
            raise ChapError(f"CHAP_I={identifier} outside 0..255")
        challenge = decode_binary("CHAP_C", keys.get("CHAP_C", ""), MAX_CHALLENGE_BYTES)
        if hmac.compare_digest(challenge, our_challenge):
            raise ChapError("the initiator's CHAP_C is our own challenge (reflection)")
        response = chap_response(identifier, self.secrets.mutual_secret, challenge)
        return [("CHAP_N", self.secrets.mutual_user), ("CHAP_R", encode_binary(response))]
