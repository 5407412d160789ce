"""Journal records: encode and decode, with no I/O (sans-I/O, like the protocol cores).

One record is one host write (or TRIM/ZERO, or a base-copy chunk) with its group-wide
sequence number. Layout, little-endian, 48-byte fixed header:

    off size field
      0    4 magic          b"JPRC"
      4    1 version        1
      5    1 op             1 WRITE, 2 TRIM, 3 ZERO
      6    1 flags          FLAG_BASE (1), FLAG_REF (2, with BASE on a WRITE); others 0
      7    1 name_len       bytes of the UTF-8 volume name (0..255)
      8    4 record_bytes   whole record: 48 + name_len + payload bytes
     12    8 seq
     20    8 timestamp_ns   wall clock of the primary when journaled (for lag seconds)
     28    8 offset         byte offset in the volume
     36    4 length         bytes affected in the volume
     40    4 payload_crc    crc32c of the payload (crc32c(b"") == 0 for TRIM/ZERO)
     44    4 header_crc     crc32c of bytes 0..43 followed by the volume name
     48      volume name    name_len bytes
             payload        `length` bytes for WRITE, none for TRIM/ZERO or a FLAG_REF WRITE

A FLAG_REF record lives only in the primary's master journal: a base-copy chunk whose data
is read from the P-VOL when it is sent (primaryd.master), so the copy writes no payload
into the journal. What crosses the wire is always a full record.

The cheap fields are checked before the crcs so that a damaged length is reported as
corruption, not as a record that merely needs more bytes. Input may come from the
network: decoding raises only TruncatedRecord (need more bytes) or CorruptRecord.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import NamedTuple

from crc32c import crc32c

BytesLike = bytes | bytearray | memoryview


class Op(enum.IntEnum):
    WRITE = 1
    TRIM = 2
    ZERO = 3


FLAG_BASE = 1  # produced by initial copy / resync, not by a host write
FLAG_REF = 2  # a base WRITE without payload: the P-VOL's data is read when it is sent
_KNOWN_FLAGS = FLAG_BASE | FLAG_REF
_REF_FLAGS = FLAG_BASE | FLAG_REF

MAGIC = b"JPRC"
VERSION = 1
# The NBD server's largest request payload; a WRITE record never carries more.
MAX_WRITE_BYTES = 32 << 20
# TRIM/ZERO carry no payload, so their length is only bounded by NBD's u32 length field.
MAX_NAME_BYTES = 255
# An off_t: offset + length must stay addressable.
_MAX_END = (1 << 63) - 1

_FIXED = struct.Struct("<4sBBBBIQQQII")  # up to and including payload_crc
_HEADER = struct.Struct("<4sBBBBIQQQIII")
_U32 = struct.Struct("<I")
_SIZE_SEQ = struct.Struct("<IQ")  # record_bytes and seq, adjacent in the header
_SIZE_SEQ_AT = 8
HEADER_BYTES = _HEADER.size  # 48
_CRC_SPAN = _FIXED.size  # 44: the header bytes covered by header_crc (before the name)
MAX_RECORD_BYTES = HEADER_BYTES + MAX_NAME_BYTES + MAX_WRITE_BYTES

_OPS = {int(op): op for op in Op}
# Plain ints: comparing with Op members costs an enum attribute lookup on the hot path.
_WRITE, _TRIM, _ZERO = int(Op.WRITE), int(Op.TRIM), int(Op.ZERO)


class TruncatedRecord(Exception):
    """The buffer ends inside the record: a torn tail, or more bytes are needed.

    `need_bytes` is how many bytes from the record's start are needed to get further
    (the whole record when the header says, else enough for the header).
    """

    def __init__(self, pos: int, need_bytes: int, have_bytes: int) -> None:
        super().__init__(f"record at pos {pos} needs {need_bytes} bytes, have {have_bytes}")
        self.pos = pos
        self.need_bytes = need_bytes


class CorruptRecord(Exception):
    """Bad magic, crc or an impossible field; the message says what and where."""


class Entry(NamedTuple):
    """A decoded record. A NamedTuple, not a frozen dataclass: the destager builds one per
    record and a frozen dataclass costs ~4 us to construct here, a tuple a fraction."""

    seq: int
    volume: str
    op: Op
    offset: int
    length: int
    timestamp_ns: int
    flags: int
    payload: memoryview  # zero-copy slice of the decoded buffer; empty for TRIM/ZERO
    record_bytes: int


class RecordHeader(NamedTuple):
    seq: int
    op: Op
    flags: int
    offset: int
    length: int
    timestamp_ns: int
    name_bytes: int
    payload_crc: int
    record_bytes: int


def record_size(volume: str, payload_len: int) -> int:
    return HEADER_BYTES + len(volume.encode()) + payload_len


def encode_record(
    seq: int,
    volume: str,
    op: Op,
    offset: int,
    length: int,
    payload: BytesLike,
    timestamp_ns: int,
    flags: int = 0,
) -> bytes:
    """One record; ValueError when the arguments cannot form a valid record (our bug)."""
    name = volume.encode()
    payload_len = len(payload)
    if not _fields_ok(op, flags, len(name), offset, length, payload_len):
        what = _fields_error(op, flags, len(name), length, payload_len)
        raise ValueError(f"record seq {seq}: {what}")
    try:
        fixed = _FIXED.pack(
            MAGIC,
            VERSION,
            op,
            flags,
            len(name),
            HEADER_BYTES + len(name) + payload_len,
            seq,
            timestamp_ns,
            offset,
            length,
            crc32c(payload),
        )
    except struct.error as exc:
        raise ValueError(f"record seq {seq}: field out of range: {exc}") from exc
    header_crc = crc32c(name, crc32c(fixed))
    return b"".join((fixed, _U32.pack(header_crc), name, payload))


def _fields_ok(
    op: int, flags: int, name_len: int, offset: int, length: int, payload_len: int
) -> bool:
    if op == _WRITE:
        if flags & FLAG_REF:
            sizes_ok = payload_len == 0 and length <= MAX_WRITE_BYTES and flags == _REF_FLAGS
        else:
            sizes_ok = payload_len == length <= MAX_WRITE_BYTES
    else:
        sizes_ok = op in (_TRIM, _ZERO) and payload_len == 0 and not flags & FLAG_REF
    return (
        sizes_ok
        and not flags & ~_KNOWN_FLAGS
        and name_len <= MAX_NAME_BYTES
        and 0 <= offset <= _MAX_END - length
    )


def _fields_error(op: int, flags: int, name_len: int, length: int, payload_len: int) -> str:
    """What _fields_ok() refused (the slow path, for the message)."""
    if op not in _OPS:
        return f"unknown op {op}"
    if flags & ~_KNOWN_FLAGS:
        return f"unknown flags {flags:#x}"
    if name_len > MAX_NAME_BYTES:
        return f"volume name of {name_len} bytes, at most {MAX_NAME_BYTES}"
    if op == _WRITE and length > MAX_WRITE_BYTES:
        return f"WRITE of {length} bytes, at most {MAX_WRITE_BYTES}"
    if flags & FLAG_REF and (op != _WRITE or flags != _REF_FLAGS):
        return f"FLAG_REF on a {_OPS[op].name} with flags {flags:#x}"
    if payload_len != (length if op == _WRITE and not flags & FLAG_REF else 0):
        return f"{_OPS[op].name} of length {length} with {payload_len} payload bytes"
    return f"range of {length} bytes outside a volume"


_Fields = tuple[bytes, int, int, int, int, int, int, int, int, int, int, int]


def _parse(buf: BytesLike, pos: int) -> _Fields:
    """The checked header fields at `pos` (one unpack, the header crc: runs per record)."""
    if pos < 0:
        raise ValueError(f"negative record position {pos}")
    avail = len(buf) - pos
    if avail < HEADER_BYTES:
        _check_magic_prefix(buf, pos, avail)
        raise TruncatedRecord(pos, HEADER_BYTES, avail)
    fields: _Fields = _HEADER.unpack_from(buf, pos)
    magic, version, op, flags, name_len, record_bytes, seq, _, offset, length, _, crc = fields
    if magic != MAGIC or version != VERSION:
        what = f"bad magic {bytes(magic)!r}" if magic != MAGIC else f"unknown version {version}"
        raise CorruptRecord(f"{what} at pos {pos}")
    payload_len = record_bytes - HEADER_BYTES - name_len
    if not _fields_ok(op, flags, name_len, offset, length, payload_len):
        what = _fields_error(op, flags, name_len, length, payload_len)
        raise CorruptRecord(f"impossible header at seq {seq} pos {pos}: {what}")
    name_end = pos + HEADER_BYTES + name_len
    if len(buf) < name_end:
        raise TruncatedRecord(pos, HEADER_BYTES + name_len, avail)
    if crc32c(buf[pos + HEADER_BYTES : name_end], crc32c(buf[pos : pos + _CRC_SPAN])) != crc:
        raise CorruptRecord(f"header crc mismatch at seq {seq} pos {pos}")
    return fields


def _check_magic_prefix(buf: BytesLike, pos: int, avail: int) -> None:
    """Fail fast on garbage even before a whole header has arrived."""
    have = min(avail, len(MAGIC))
    if have > 0 and bytes(buf[pos : pos + have]) != MAGIC[:have]:
        raise CorruptRecord(f"bad magic at pos {pos}")


def parse_header(buf: BytesLike, pos: int = 0) -> RecordHeader:
    """Validate the header at `pos` (magic, fields, header crc); the payload may be absent."""
    _, _, op, flags, name_len, record_bytes, seq, ts_ns, offset, length, crc, _ = _parse(buf, pos)
    return RecordHeader(seq, _OPS[op], flags, offset, length, ts_ns, name_len, crc, record_bytes)


def decode_header(buf: BytesLike, pos: int = 0) -> tuple[int, int]:
    """(seq, record_bytes) of the record at `pos`; checks the header, not the payload crc."""
    fields = _parse(buf, pos)
    return fields[6], fields[5]


def peek_header(buf: BytesLike, pos: int = 0) -> tuple[int, int]:
    """(seq, record_bytes) read from the header, unchecked: only for records we encoded."""
    if len(buf) - pos < HEADER_BYTES:
        raise TruncatedRecord(pos, HEADER_BYTES, len(buf) - pos)
    record_bytes, seq = _SIZE_SEQ.unpack_from(buf, pos + _SIZE_SEQ_AT)
    return seq, record_bytes


def decode_record(buf: BytesLike, pos: int = 0, *, check_payload: bool = True) -> tuple[Entry, int]:
    """The checked record at `pos` and the position after it. check_payload=False skips
    the payload crc, for records this process already checked (the header is always).

    Its payload is a view of `buf`: a bytearray cannot be resized while the entry lives.
    """
    fields = _parse(buf, pos)
    _, _, op, flags, _, record_bytes, seq, ts_ns, offset, length, _, _ = fields
    volume, payload = _check_body(memoryview(buf), pos, fields, check_payload)
    entry = Entry(seq, volume, _OPS[op], offset, length, ts_ns, flags, payload, record_bytes)
    return entry, pos + record_bytes


def check_record(buf: BytesLike, pos: int = 0) -> tuple[int, int]:
    """(seq, position after it) of the fully checked record at `pos`, building no Entry."""
    fields = _parse(buf, pos)
    _check_body(memoryview(buf), pos, fields)
    return fields[6], pos + fields[5]


def _check_body(
    view: memoryview, pos: int, fields: _Fields, check_payload: bool = True
) -> tuple[str, memoryview]:
    """The volume name and payload of a record whose header passed _parse()."""
    name_len, record_bytes, seq, payload_crc = fields[4], fields[5], fields[6], fields[10]
    end = pos + record_bytes
    if len(view) < end:
        raise TruncatedRecord(pos, record_bytes, len(view) - pos)
    name_start = pos + HEADER_BYTES
    payload = view[name_start + name_len : end]
    if check_payload and crc32c(payload) != payload_crc:
        raise CorruptRecord(f"payload crc mismatch at seq {seq} pos {pos}")
    try:
        volume = str(view[name_start : name_start + name_len], "utf-8")
    except UnicodeDecodeError:
        raise CorruptRecord(f"volume name not UTF-8 at seq {seq} pos {pos}") from None
    return volume, payload


def iter_records(buf: BytesLike, *, check_payload: bool = True) -> Iterator[Entry]:
    """Every record of a blob of concatenated records, checked (see decode_record)."""
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        entry, pos = decode_record(view, pos, check_payload=check_payload)
        yield entry
