"""TLS as a pipe of bytes (ssl.MemoryBIO): the server side of the replication link and of
NBD connections after NBD_OPT_STARTTLS.

    transport bytes ─► receive() ─► handshake, then plaintext out ─► the protocol core
    protocol bytes  ─► wrap()    ─► TLS records ─► transport.write()
    to_send(): what the handshake (or an alert) has to send back

Why not the listener's `ssl=`: asyncio completes the handshake inside the loop and, when it
fails, tells nobody but the debug log; an operator must see "refused 10.0.0.7: certificate
verify failed". Why not loop.start_tls(): bytes that arrive before the upgrade starts
reach the plain protocol, not TLS. Here every byte goes through the SSLObject and every
failure is an ssl.SSLError in the caller's hands.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

READ_CHUNK_BYTES = 256 << 10


class TlsPipe:
    def __init__(self, context: ssl.SSLContext, *, server_side: bool = True) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self.established = False
        self.closed = False  # the peer sent close_notify

    def receive(self, data: bytes | memoryview) -> bytes:
        """The plaintext that `data` completes (b"" during the handshake). ssl.SSLError
        when the peer fails the handshake (then to_send() may hold an alert for it)."""
        self.feed(data)
        chunks = []
        while self.established:
            try:
                chunk = self._tls.read(READ_CHUNK_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def feed(self, data: bytes | memoryview) -> None:
        """Take TLS records from the peer, and go on with the handshake while it runs;
        read_into() then gives the plaintext. ssl.SSLError as for receive()."""
        self._incoming.write(data)
        if not self.established:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            self.established = True

    def read_into(self, buffer: memoryview) -> int:
        """Plaintext fed so far into `buffer`, as much as fits (no copy in between): how many
        bytes, 0 when there is none (yet). ssl.SSLError on a damaged record."""
        filled = 0
        while self.established and filled < len(buffer):
            try:  # one record at most per read
                n = int(self._tls.read(len(buffer) - filled, buffer[filled:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not n:
                break
            filled += n
        return filled

    def wrap(self, data: bytes) -> bytes:
        """TLS records carrying `data`, to write to the transport."""
        if data:
            self._tls.write(data)
        return self._outgoing.read()

    def write(self, data: bytes | memoryview) -> None:
        """Encrypt `data` (after the handshake); to_send() then holds the records."""
        self._tls.write(data)

    def to_send(self) -> bytes:
        return self._outgoing.read()

    def close(self) -> bytes:
        """close_notify, to send before closing the connection (b"" before the handshake)."""
        if self.established:
            # SSLWantReadError: the peer's close_notify is not awaited.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
        return self._outgoing.read()

    def version(self) -> str:
        return (self._tls.version() if self.established else None) or "?"

    def peer_name(self) -> str:
        """The commonName of the peer's verified certificate ("?" when it has none)."""
        cert: dict[str, Any] = (self._tls.getpeercert() if self.established else None) or {}
        for rdn in cert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    return str(value)
        return "?"
