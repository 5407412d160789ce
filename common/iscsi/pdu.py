"""iSCSI PDU framing (RFC 7143 section 11): the 48-byte Basic Header Segment, AHS, digests.

    bytes ─► PduReader.feed() ─► PduReader.next_pdu() ─► Pdu (BHS parsed, AHS skipped,
             (bounded buffer)      header digest checked,     data without padding)
                                   data digest checked
    Pdu ─► encode_pdu(pdu, digests) ─► bytes (data padded to 4, digests appended)

No socket, no clock. Everything a peer can get wrong raises RemoteProtocolError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import crc32c


class RemoteProtocolError(Exception):
    """The initiator broke the protocol; the connection must be closed."""


class LocalProtocolError(Exception):
    """We misused the core (a bug in the caller)."""


class DigestError(RemoteProtocolError):
    """A header or data digest did not match (RFC 7143 7.8: close at ErrorRecoveryLevel 0)."""


class Op(IntEnum):
    # initiator opcodes
    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TASK_MGMT_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK_REQ = 0x10
    # target opcodes
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TASK_MGMT_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC_MSG = 0x32
    REJECT = 0x3F


INITIATOR_OPS = frozenset(
    (
        Op.NOP_OUT,
        Op.SCSI_CMD,
        Op.TASK_MGMT_REQ,
        Op.LOGIN_REQ,
        Op.TEXT_REQ,
        Op.DATA_OUT,
        Op.LOGOUT_REQ,
        Op.SNACK_REQ,
    )
)

BHS_BYTES = 48
DIGEST_BYTES = 4
RESERVED_TAG = 0xFFFFFFFF
FLAG_FINAL = 0x80
FLAG_IMMEDIATE = 0x40
# DataSegmentLength is a 24-bit field; TotalAHSLength counts 4-byte words in one byte.
MAX_DATA_SEGMENT_BYTES = (1 << 24) - 1
MAX_AHS_BYTES = 255 * 4
# RFC 7143 13.12: MaxRecvDataSegmentLength is 512..2**24-1.
MIN_RECV_DATA_SEGMENT_BYTES = 512
DEFAULT_RECV_DATA_SEGMENT_BYTES = 8192

# byte 4 (TotalAHSLength) and bytes 5..7 (DataSegmentLength) as one 32-bit word
_BHS = struct.Struct(">BBBBI8sI28s")
_U32 = struct.Struct(">I")
_FIELDS = struct.Struct(">7I")


def pad4(length: int) -> int:
    """The padding after a data segment of `length` bytes (RFC 7143 11.2.3)."""
    return -length % 4


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """CRC32C as iSCSI sends it: least significant byte first (RFC 7143 13.1, B.4)."""
    return crc32c.crc32c(data).to_bytes(4, "little")


@dataclass(slots=True)
class Pdu:
    """One PDU. `opcode_specific` is BHS bytes 20..47 (28 bytes); `flags` is byte 1;
    `spec2`/`spec3` are bytes 2 and 3; `lun_or_isid` is bytes 8..15."""

    opcode: int
    flags: int = 0
    immediate: bool = False
    spec2: int = 0
    spec3: int = 0
    lun_or_isid: bytes = bytes(8)
    itt: int = RESERVED_TAG
    opcode_specific: bytes = bytes(28)
    data: bytes = b""
    ahs: bytes = field(default=b"", repr=False)

    @property
    def final(self) -> bool:
        return bool(self.flags & FLAG_FINAL)

    def field32(self, offset: int) -> int:
        """The 32-bit field at BHS byte `offset` (20..44)."""
        start = offset - 20
        value: int = _U32.unpack_from(self.opcode_specific, start)[0]
        return value

    def bhs(self) -> bytes:
        if len(self.data) > MAX_DATA_SEGMENT_BYTES:
            raise LocalProtocolError(f"data segment of {len(self.data)} bytes")
        if len(self.lun_or_isid) != 8 or len(self.opcode_specific) != 28:
            raise LocalProtocolError("bad BHS field length")
        if len(self.ahs) % 4:
            raise LocalProtocolError("AHS not a multiple of 4 bytes")
        byte0 = (self.opcode & 0x3F) | (FLAG_IMMEDIATE if self.immediate else 0)
        return _BHS.pack(
            byte0,
            self.flags,
            self.spec2,
            self.spec3,
            (len(self.ahs) // 4) << 24 | len(self.data),
            self.lun_or_isid,
            self.itt,
            self.opcode_specific,
        )


def pack_fields(*words: int) -> bytes:
    """BHS bytes 20..47 from seven 32-bit words (the layout every opcode uses)."""
    if len(words) != 7:
        raise LocalProtocolError(f"{len(words)} words for the opcode-specific fields")
    return _FIELDS.pack(*words)


def encode_pdu(pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    if not (header_digest or data_digest or pdu.ahs):  # the usual case: one copy, no join
        pad = pad4(len(pdu.data))
        return pdu.bhs() + pdu.data + bytes(pad) if pad else pdu.bhs() + pdu.data
    header = pdu.bhs() + pdu.ahs
    parts = [header]
    if header_digest:
        parts.append(digest(header))
    if pdu.data:
        padded = pdu.data + bytes(pad4(len(pdu.data)))
        parts.append(padded)
        if data_digest:
            parts.append(digest(padded))
    return b"".join(parts)


def decode_bhs(bhs: bytes | bytearray | memoryview) -> tuple[Pdu, int, int]:
    """Parse a BHS: (pdu without data, AHS bytes, data segment bytes)."""
    if len(bhs) != BHS_BYTES:
        raise LocalProtocolError(f"BHS of {len(bhs)} bytes")
    return _decode_bhs_at(bhs, 0)


def _decode_bhs_at(buf: bytes | bytearray | memoryview, at: int) -> tuple[Pdu, int, int]:
    byte0, flags, spec2, spec3, lengths, lun, itt, rest = _BHS.unpack_from(buf, at)
    pdu = Pdu(
        byte0 & 0x3F,
        flags,
        bool(byte0 & FLAG_IMMEDIATE),
        spec2,
        spec3,
        lun,
        itt,
        rest,
    )
    return pdu, (lengths >> 24) * 4, lengths & 0xFFFFFF


class PduReader:
    """Frames initiator PDUs from a byte stream, with a bound on everything it holds.

    `max_data_bytes` is our MaxRecvDataSegmentLength (what we declared we accept);
    a PDU announcing more is a protocol error before its data is read. During login
    the digests are off; set `header_digest`/`data_digest` once they are negotiated.
    """

    def __init__(self, max_data_bytes: int = DEFAULT_RECV_DATA_SEGMENT_BYTES) -> None:
        self.max_data_bytes = max_data_bytes
        self.header_digest = False
        self.data_digest = False
        self._buf = bytearray()

    @property
    def buffer_limit(self) -> int:
        """The most this reader ever holds: one whole PDU with AHS and digests."""
        return BHS_BYTES + MAX_AHS_BYTES + 2 * DIGEST_BYTES + self.max_data_bytes + 3

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def wants(self) -> int:
        """How many more bytes the reader may take now without passing its bound."""
        return max(0, self.buffer_limit - len(self._buf))

    def next_pdu(self) -> Pdu | None:
        """The next whole PDU, or None until more bytes come."""
        buf = self._buf
        if len(buf) < BHS_BYTES:
            return None
        pdu, ahs_bytes, data_bytes = _decode_bhs_at(buf, 0)
        if pdu.opcode not in INITIATOR_OPS:
            raise RemoteProtocolError(f"opcode 0x{pdu.opcode:02x} is not an initiator opcode")
        if data_bytes > self.max_data_bytes:
            raise RemoteProtocolError(
                f"data segment of {data_bytes} bytes, more than MaxRecvDataSegmentLength "
                f"{self.max_data_bytes}"
            )
        header_end = BHS_BYTES + ahs_bytes
        data_start = header_end + (DIGEST_BYTES if self.header_digest else 0)
        padded = data_bytes + pad4(data_bytes)
        data_end = data_start + padded
        total = data_end + (DIGEST_BYTES if self.data_digest and data_bytes else 0)
        if len(buf) < total:
            return None
        if not (self.header_digest or self.data_digest or ahs_bytes):  # the usual case
            pdu.data = bytes(memoryview(buf)[data_start : data_start + data_bytes])
            del buf[:total]
            return pdu
        view = memoryview(buf)
        try:
            if self.header_digest and digest(view[:header_end]) != bytes(
                view[header_end:data_start]
            ):
                raise DigestError(f"header digest mismatch on opcode 0x{pdu.opcode:02x}")
            if (
                self.data_digest
                and data_bytes
                and digest(view[data_start:data_end]) != bytes(view[data_end:total])
            ):
                raise DigestError(f"data digest mismatch on opcode 0x{pdu.opcode:02x}")
            pdu.ahs = bytes(view[BHS_BYTES:header_end])
            pdu.data = bytes(view[data_start : data_start + data_bytes])
        finally:
            view.release()
        del buf[:total]
        return pdu
