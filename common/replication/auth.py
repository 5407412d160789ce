"""Shared-secret mutual authentication of the replication link (sans-I/O).

Before Hello, when `link.secret_file` is set on both sites:

    primary (server)                              secondary (client)
      ── CHALLENGE "JPAU" version nonce_s (37 B) ──►
      ◄── RESPONSE "JPAU" nonce_c mac_c (68 B) ────   mac_c = HMAC(secret, "client"‖ns‖nc)
      checks mac_c, else closes the link
      ── PROOF     mac_s (32 B) ───────────────────►   mac_s = HMAC(secret, "server"‖nc‖ns)
                                                    checks mac_s, else closes the link
then the replication protocol (Hello ...) as usual, on the same connection.

HMAC-SHA256 over both fresh nonces: the secret never crosses the wire, a recorded exchange
cannot be replayed (the other side's nonce is new), and the role labels stop an answer from
being reflected back to its sender. This authenticates; it does not encrypt: `link.tls`
does (the exchange then runs inside TLS).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

MAGIC = b"JPAU"
VERSION = 1
NONCE_BYTES = 32
MAC_BYTES = 32
SECRET_MIN_BYTES = 16
_CHALLENGE = struct.Struct(f"<4sB{NONCE_BYTES}s")
_RESPONSE = struct.Struct(f"<4s{NONCE_BYTES}s{MAC_BYTES}s")
CHALLENGE_BYTES = _CHALLENGE.size  # 37
RESPONSE_BYTES = _RESPONSE.size  # 68
PROOF_BYTES = MAC_BYTES


class AuthFailed(Exception):
    """The peer did not prove it holds the secret; str() says how, for the log."""


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


class ServerHandshake:
    """The primary's side: challenge(), then feed received bytes to receive() until it
    returns the proof to send; `leftover` is what the peer sent after its response."""

    def __init__(self, secret: bytes, nonce: bytes | None = None) -> None:
        self._secret = secret
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
        self._buf = bytearray()
        self.leftover = b""
        self.done = False

    def challenge(self) -> bytes:
        return _CHALLENGE.pack(MAGIC, VERSION, self._nonce)

    def receive(self, data: bytes) -> bytes | None:
        """The proof once the whole response is in and checks out; None: more bytes.
        AuthFailed when it does not check out (close the link)."""
        if self.done:
            raise ValueError("handshake already done")
        self._buf += data
        prefix = bytes(self._buf[: len(MAGIC)])
        if prefix != MAGIC[: len(prefix)]:  # e.g. a Hello: that site has no secret
            raise AuthFailed("no authentication response (is link.secret_file set there?)")
        if len(self._buf) < RESPONSE_BYTES:
            return None
        _, peer_nonce, peer_mac = _RESPONSE.unpack_from(self._buf)
        expected = _mac(self._secret, b"client", self._nonce, peer_nonce)
        if not hmac.compare_digest(peer_mac, expected):
            raise AuthFailed("wrong shared secret (its HMAC does not match)")
        self.leftover = bytes(self._buf[RESPONSE_BYTES:])
        self._buf.clear()
        self.done = True
        return _mac(self._secret, b"server", peer_nonce, self._nonce)


class ClientHandshake:
    """The secondary's side: respond(challenge) -> the response to send; then
    check_proof(proof), which raises AuthFailed when the primary lacks the secret."""

    def __init__(self, secret: bytes, nonce: bytes | None = None) -> None:
        self._secret = secret
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
        self._peer_nonce: bytes | None = None

    def respond(self, challenge: bytes) -> bytes:
        if len(challenge) != CHALLENGE_BYTES or challenge[: len(MAGIC)] != MAGIC:
            raise AuthFailed("no authentication challenge (is link.secret_file set there?)")
        _, version, peer_nonce = _CHALLENGE.unpack(challenge)
        if version != VERSION:
            raise AuthFailed(f"authentication version {version}, this site speaks {VERSION}")
        self._peer_nonce = peer_nonce
        mac = _mac(self._secret, b"client", peer_nonce, self._nonce)
        return _RESPONSE.pack(MAGIC, self._nonce, mac)

    def check_proof(self, proof: bytes) -> None:
        if self._peer_nonce is None:
            raise ValueError("respond() first")
        expected = _mac(self._secret, b"server", self._nonce, self._peer_nonce)
        if len(proof) != PROOF_BYTES or not hmac.compare_digest(proof, expected):
            raise AuthFailed("wrong shared secret (the primary's HMAC does not match)")
