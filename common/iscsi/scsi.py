"""SCSI block commands for a disk LUN (SPC-4, SBC-3): CDB in, reply or I/O to do out.

    cdb ─► execute(cdb, lun, luns) ─► Reply(status, data, sense)    answered here
                                  └─► Io(kind, offset, length, fua)  the adapter does it
    UNMAP / WRITE SAME Io, its Data-Out in ─► parameters_received() ─► Reply
                                                                    ├─► Unmap(extents)
                                                                    └─► WriteSame(range, block)

No disk access: READ, WRITE, SYNCHRONIZE CACHE, UNMAP and WRITE SAME become an `Io` for the
adapter; everything else (INQUIRY, READ CAPACITY, MODE SENSE, REPORT LUNS, ...) is answered
from `LunInfo`. LUNs are thin (SBC-4 4.7): an unmapped block reads as zeros (LBPRZ).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum

from common.iscsi.pdu import LocalProtocolError

BLOCK_BYTES = 512
VENDOR = b"JPAIR   "  # 8 bytes, T10 vendor identification
PRODUCT = b"journalpair     "  # 16 bytes
REVISION = b"0001"
# SAM-5, iSCSI, SPC-4, SBC-3 (SPC-4 table 32): what standard INQUIRY claims
VERSION_DESCRIPTORS = struct.pack(">4H", 0x00A0, 0x0960, 0x0460, 0x04C0)


class Status(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    ILLEGAL_REQUEST = 0x5
    DATA_PROTECT = 0x7


# (sense key, additional sense code, qualifier)
LBA_OUT_OF_RANGE = (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
INVALID_OPCODE = (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
LUN_NOT_SUPPORTED = (SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
SAVING_NOT_SUPPORTED = (SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
WRITE_PROTECTED = (SenseKey.DATA_PROTECT, 0x27, 0x00)
READ_ERROR = (SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = (SenseKey.MEDIUM_ERROR, 0x0C, 0x00)


class Opcode(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0


READ_CAPACITY_16_ACTION = 0x10
CDB_BYTES = {  # the CDB length by group code (opcode >> 5)
    0: 6,
    1: 10,
    2: 10,
    4: 16,
    5: 12,
}


@dataclass(frozen=True, slots=True)
class LunInfo:
    size_bytes: int
    serial: str
    read_only: bool = False

    @property
    def blocks(self) -> int:
        return self.size_bytes // BLOCK_BYTES


@dataclass(frozen=True, slots=True)
class Reply:
    status: Status
    data: bytes = b""
    sense: bytes = b""


class IoKind(Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    UNMAP = "unmap"
    WRITE_SAME = "write same"


DATA_OUT_KINDS = frozenset((IoKind.WRITE, IoKind.UNMAP, IoKind.WRITE_SAME))
# execute()'s per-command lookups, done once (Python 3.11 takes ~0.2 us an Enum.MEMBER)
_REPORT_LUNS, _INQUIRY = Opcode.REPORT_LUNS, Opcode.INQUIRY
_REQUEST_SENSE = Opcode.REQUEST_SENSE
_RW_10 = frozenset((Opcode.READ_10, Opcode.WRITE_10))
_WRITES = frozenset((Opcode.WRITE_10, Opcode.WRITE_16))
_READ, _WRITE = IoKind.READ, IoKind.WRITE


# slots, not frozen: made once a command (a frozen dataclass costs ~2 µs more to build)
@dataclass(slots=True)
class Io:
    """`length` is the bytes the command moves: READ/WRITE's data, UNMAP's parameter list,
    WRITE SAME's one block. `span` is the bytes of the medium WRITE SAME covers."""

    kind: IoKind
    offset: int = 0
    length: int = 0
    fua: bool = False
    span: int = 0
    unmap: bool = False  # WRITE SAME's UNMAP bit


@dataclass(frozen=True, slots=True)
class Unmap:
    """Deallocate each (byte offset, length) extent; each then reads as zeros (LBPRZ)."""

    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class WriteSame:
    """Make [offset, offset + length) the block repeated."""

    offset: int
    length: int
    block: bytes


def sense_data(key_asc_ascq: tuple[int, int, int]) -> bytes:
    """Fixed-format sense data (SPC-4 4.5.3), current error."""
    key, asc, ascq = key_asc_ascq
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key & 0x0F
    sense[7] = 10  # additional sense length
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


def check_condition(key_asc_ascq: tuple[int, int, int]) -> Reply:
    return Reply(Status.CHECK_CONDITION, sense=sense_data(key_asc_ascq))


def encode_lun(lun: int) -> bytes:
    """SAM LUN: peripheral addressing below 256, flat addressing up to 16383."""
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


def decode_lun(field: bytes) -> int:
    method = field[0] >> 6
    if method in (0, 1):  # peripheral (bus 0) or flat
        return ((field[0] & 0x3F) << 8) | field[1]
    return -1  # an addressing method we do not serve: no such LUN


def execute(cdb: bytes, lun: int, luns: Mapping[int, LunInfo]) -> Reply | Io:
    opcode = cdb[0]
    if opcode == _REPORT_LUNS:
        return _report_luns(cdb, luns)
    info = luns.get(lun)
    if opcode == _INQUIRY:
        return _inquiry(cdb, lun, info)
    if opcode == _REQUEST_SENSE:
        return Reply(Status.GOOD, sense_data((SenseKey.NO_SENSE, 0, 0))[: cdb[4]])
    if info is None:
        return check_condition(LUN_NOT_SUPPORTED)
    handler = _HANDLERS.get(opcode)
    if handler is None:
        return check_condition(INVALID_OPCODE)
    return handler(cdb, info)


def _test_unit_ready(cdb: bytes, info: LunInfo) -> Reply | Io:
    return Reply(Status.GOOD)


def _read_capacity_10(cdb: bytes, info: LunInfo) -> Reply | Io:
    last = min(info.blocks - 1, 0xFFFFFFFF)
    return Reply(Status.GOOD, struct.pack(">II", last, BLOCK_BYTES))


def _service_action_in_16(cdb: bytes, info: LunInfo) -> Reply | Io:
    if cdb[1] & 0x1F != READ_CAPACITY_16_ACTION:
        return check_condition(INVALID_FIELD_IN_CDB)
    allocation = struct.unpack_from(">I", cdb, 10)[0]
    # LBPME: thin provisioned; LBPRZ: an unmapped block reads zeros. One logical block per
    # physical block: with 8 (the 4 KiB a file system punches), libiscsi's iscsi-test-cu
    # sends CDBs other than it logs (a READ (16) of 256 blocks asks for 257) after its
    # COMPARE AND WRITE tests, and a full run fails where it should not.
    data = struct.pack(">QIBBBB", info.blocks - 1, BLOCK_BYTES, 0, 0, 0xC0, 0) + bytes(16)
    return Reply(Status.GOOD, data[:allocation])


def _rw(cdb: bytes, info: LunInfo) -> Reply | Io:
    opcode = cdb[0]
    if opcode in _RW_10:
        lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    write = opcode in _WRITES
    if cdb[1] & 0xE0:  # RDPROTECT/WRPROTECT: no protection information here
        return check_condition(INVALID_FIELD_IN_CDB)
    if lba + blocks > info.blocks:
        return check_condition(LBA_OUT_OF_RANGE)
    if write and info.read_only:
        return check_condition(WRITE_PROTECTED)
    if blocks * BLOCK_BYTES > MAX_TRANSFER_BYTES:
        return check_condition(INVALID_FIELD_IN_CDB)
    kind = _WRITE if write else _READ
    return Io(kind, lba * BLOCK_BYTES, blocks * BLOCK_BYTES, fua=bool(cdb[1] & 0x08))


def _synchronize_cache(cdb: bytes, info: LunInfo) -> Reply | Io:
    if cdb[0] == Opcode.SYNCHRONIZE_CACHE_10:
        lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    if lba + blocks > info.blocks:
        return check_condition(LBA_OUT_OF_RANGE)
    return Io(IoKind.FLUSH)


def _unmap(cdb: bytes, info: LunInfo) -> Reply | Io:
    if cdb[1] & 0x01:  # ANCHOR: anchored LBAs are not supported (ANC_SUP is 0)
        return check_condition(INVALID_FIELD_IN_CDB)
    if info.read_only:
        return check_condition(WRITE_PROTECTED)
    return Io(IoKind.UNMAP, length=struct.unpack_from(">H", cdb, 7)[0])


def _write_same(cdb: bytes, info: LunInfo) -> Reply | Io:
    # WRPROTECT (no protection information), ANCHOR (ANC_SUP is 0), the obsolete PBDATA and
    # LBDATA: none is supported. NDOB (WRITE SAME (16) only): no block is sent, zeros meant.
    ndob = cdb[0] == Opcode.WRITE_SAME_16 and bool(cdb[1] & 0x01)
    if cdb[1] & 0xF6 or (cdb[1] & 0x01 and not ndob):
        return check_condition(INVALID_FIELD_IN_CDB)
    if cdb[0] == Opcode.WRITE_SAME_10:
        lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    if blocks == 0:  # WSNZ is 0: zero blocks means up to the last LBA (SBC-4 5.50)
        if lba >= info.blocks:
            return check_condition(LBA_OUT_OF_RANGE)
        blocks = info.blocks - lba
    if lba + blocks > info.blocks:
        return check_condition(LBA_OUT_OF_RANGE)
    if blocks > MAX_WRITE_SAME_BLOCKS:
        return check_condition(INVALID_FIELD_IN_CDB)
    if info.read_only:
        return check_condition(WRITE_PROTECTED)
    return Io(
        IoKind.WRITE_SAME,
        lba * BLOCK_BYTES,
        0 if ndob else BLOCK_BYTES,
        span=blocks * BLOCK_BYTES,
        unmap=bool(cdb[1] & 0x08),
    )


def fit_data_out(io: Io, expected_bytes: int) -> Io | None:
    """`io` for the Data-Out the initiator announced (ExpectedDataTransferLength), or None
    when that cannot be: WRITE SAME takes exactly its one block, or none with NDOB. A WRITE
    SAME with UNMAP that announces none is taken as NDOB, as SBC-3 initiators from before
    NDOB send it (libiscsi's conformance tests among them)."""
    if io.kind is not IoKind.WRITE_SAME or expected_bytes == io.length:
        return io
    if io.unmap and expected_bytes == 0:
        return dataclasses.replace(io, length=0)
    return None


def parameters_received(io: Io, data: bytes, info: LunInfo) -> Reply | Unmap | WriteSame:
    """What an UNMAP or WRITE SAME asks for, now that its Data-Out (`data`, at most
    `io.length` bytes) is in; a Reply when there is nothing to do or it is refused."""
    if io.kind is IoKind.UNMAP:
        return _unmap_parameters(data, info)
    if io.kind is not IoKind.WRITE_SAME:
        raise LocalProtocolError(f"{io.kind.value} has no parameters")
    block = data or bytes(BLOCK_BYTES)  # NDOB: a block of zeros
    if io.unmap and block == bytes(BLOCK_BYTES):
        # an unmapped block reads as zeros (LBPRZ), so unmapping writes this block
        return Unmap(((io.offset, io.span),))
    return WriteSame(io.offset, io.span, block)


def _unmap_parameters(data: bytes, info: LunInfo) -> Reply | Unmap:
    """The UNMAP parameter list (SBC-4 5.32.2): an 8-byte header, then 16-byte block
    descriptors (LBA, NUMBER OF LOGICAL BLOCKS); an incomplete last one is ignored."""
    if len(data) < 8:
        return check_condition(PARAMETER_LIST_LENGTH_ERROR)
    descriptor_bytes = min(struct.unpack_from(">H", data, 2)[0], len(data) - 8)
    count = descriptor_bytes // 16
    if count > MAX_UNMAP_DESCRIPTORS:
        return check_condition(INVALID_FIELD_IN_PARAMETER_LIST)
    extents: list[tuple[int, int]] = []
    total_blocks = 0
    for at in range(8, 8 + count * 16, 16):
        lba, blocks = struct.unpack_from(">QI", data, at)
        if lba + blocks > info.blocks:
            return check_condition(LBA_OUT_OF_RANGE)
        total_blocks += blocks
        if blocks:
            extents.append((lba * BLOCK_BYTES, blocks * BLOCK_BYTES))
    if total_blocks > MAX_UNMAP_BLOCKS:
        return check_condition(INVALID_FIELD_IN_PARAMETER_LIST)
    if not extents:
        return Reply(Status.GOOD)
    return Unmap(tuple(extents))


def _mode_pages(page: int, changeable: bool) -> bytes | None:
    caching = bytearray(20)
    caching[0:2] = b"\x08\x12"
    control = bytearray(12)
    control[0:2] = b"\x0a\x0a"
    if not changeable:
        caching[2] = 0x04  # WCE: writes are cached until SYNCHRONIZE CACHE (or FUA)
    pages = {0x08: bytes(caching), 0x0A: bytes(control)}
    if page == 0x3F:
        return b"".join(pages.values())
    return pages.get(page)


def _mode_sense(cdb: bytes, info: LunInfo) -> Reply | Io:
    six = cdb[0] == Opcode.MODE_SENSE_6
    dbd = bool(cdb[1] & 0x08)
    control, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if control == 3:
        return check_condition(SAVING_NOT_SUPPORTED)
    pages = _mode_pages(page, changeable=control == 1) if subpage in (0, 0xFF) else None
    if pages is None:
        return check_condition(INVALID_FIELD_IN_CDB)
    device_specific = 0x10 | (0x80 if info.read_only else 0)  # DPOFUA, WP
    block_descriptor = b""
    if not dbd:
        blocks = min(info.blocks, 0xFFFFFF)
        block_descriptor = struct.pack(">I", blocks) + struct.pack(">I", BLOCK_BYTES)
    body = block_descriptor + pages
    if six:
        header = bytes((3 + len(body), 0, device_specific, len(block_descriptor)))
        allocation = cdb[4]
    else:
        header = struct.pack(
            ">HBBBBH", 6 + len(body), 0, device_specific, 0, 0, len(block_descriptor)
        )
        allocation = struct.unpack_from(">H", cdb, 7)[0]
    return Reply(Status.GOOD, (header + body)[:allocation])


def _inquiry(cdb: bytes, lun: int, info: LunInfo | None) -> Reply:
    evpd, page = cdb[1] & 0x01, cdb[2]
    allocation = struct.unpack_from(">H", cdb, 3)[0]
    if cdb[1] & 0xFE or (not evpd and page):
        return check_condition(INVALID_FIELD_IN_CDB)
    qualifier_type = 0x00 if info is not None else 0x7F  # 0x7F: no LUN here (SPC-4 6.6.2)
    if not evpd:
        data = bytearray(66)
        data[0] = qualifier_type
        data[2] = 0x06  # SPC-4
        data[3] = 0x12  # HiSup, response data format 2
        data[4] = len(data) - 5
        data[7] = 0x02  # CmdQue
        data[8:36] = VENDOR + PRODUCT + REVISION
        data[58:66] = VERSION_DESCRIPTORS
        return Reply(Status.GOOD, bytes(data[:allocation]))
    if info is None:
        return check_condition(LUN_NOT_SUPPORTED)
    body = _vpd_page(page, lun, info)
    if body is None:
        return check_condition(INVALID_FIELD_IN_CDB)
    page_data = bytes((qualifier_type, page)) + struct.pack(">H", len(body)) + body
    return Reply(Status.GOOD, page_data[:allocation])


VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
# The largest READ/WRITE served (Block Limits VPD page): it bounds a write's buffer.
MAX_TRANSFER_BYTES = 4 << 20
# Thin provisioning limits, also in the Block Limits VPD page. One UNMAP unmaps at most
# 512 MiB (so each extent fits a journal record's u32 length; libiscsi's conformance test
# calls more than 2^20 blocks insane) in at most 256 descriptors (a 4 KiB parameter list).
# A WRITE SAME covers at most what a WRITE may: its repeated block is written as long as a
# WRITE of that size takes.
MAX_UNMAP_DESCRIPTORS = 256
MAX_UNMAP_BLOCKS = 1 << 20
MAX_WRITE_SAME_BLOCKS = MAX_TRANSFER_BYTES // BLOCK_BYTES
# A file system punches whole 4 KiB blocks; a smaller unmap zeroes in place.
UNMAP_GRANULARITY_BLOCKS = 4096 // BLOCK_BYTES


def _vpd_page(page: int, lun: int, info: LunInfo) -> bytes | None:
    serial = info.serial.encode("ascii")
    if page == 0x00:
        return bytes(VPD_PAGES)
    if page == 0xB0:
        return _block_limits()
    if page == 0xB1:  # Block Device Characteristics: MEDIUM ROTATION RATE 1, non-rotating
        return b"\x00\x01" + bytes(58)
    if page == 0xB2:  # Logical Block Provisioning: LBPU, LBPWS, LBPWS10, LBPRZ 001b; thin
        return bytes((0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0))
    if page == 0x80:
        return serial
    if page == 0x83:
        # NAA locally assigned (type 3): 60 bits from the serial, stable across restarts.
        naa = (0x3 << 60) | (int.from_bytes(_fnv64(serial), "big") & ((1 << 60) - 1))
        t10 = VENDOR + serial
        return (
            bytes((0x01, 0x03, 0x00, 8))
            + naa.to_bytes(8, "big")
            + bytes((0x02, 0x01, 0x00, len(t10)))
            + t10
        )
    return None


def _block_limits() -> bytes:
    """Block Limits VPD page (SBC-4 6.6.4) after its 4-byte header; WSNZ is 0."""
    limits = bytearray(60)
    struct.pack_into(">I", limits, 4, MAX_TRANSFER_BYTES // BLOCK_BYTES)
    struct.pack_into(">II", limits, 16, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS)
    struct.pack_into(">II", limits, 24, UNMAP_GRANULARITY_BLOCKS, 0x80000000)  # UGAVALID, 0
    struct.pack_into(">Q", limits, 32, MAX_WRITE_SAME_BLOCKS)
    return bytes(limits)


def _fnv64(data: bytes) -> bytes:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value.to_bytes(8, "big")


def _report_luns(cdb: bytes, luns: Mapping[int, LunInfo]) -> Reply:
    allocation = struct.unpack_from(">I", cdb, 6)[0]
    if allocation < 16 or cdb[2] not in (0x00, 0x01, 0x02):
        return check_condition(INVALID_FIELD_IN_CDB)
    entries = b"".join(encode_lun(lun) for lun in sorted(luns))
    data = struct.pack(">I", len(entries)) + bytes(4) + entries
    return Reply(Status.GOOD, data[:allocation])


_HANDLERS: dict[int, Callable[[bytes, LunInfo], Reply | Io]] = {
    Opcode.TEST_UNIT_READY: _test_unit_ready,
    Opcode.READ_CAPACITY_10: _read_capacity_10,
    Opcode.SERVICE_ACTION_IN_16: _service_action_in_16,
    Opcode.READ_10: _rw,
    Opcode.READ_16: _rw,
    Opcode.WRITE_10: _rw,
    Opcode.WRITE_16: _rw,
    Opcode.SYNCHRONIZE_CACHE_10: _synchronize_cache,
    Opcode.SYNCHRONIZE_CACHE_16: _synchronize_cache,
    Opcode.UNMAP: _unmap,
    Opcode.WRITE_SAME_10: _write_same,
    Opcode.WRITE_SAME_16: _write_same,
    Opcode.MODE_SENSE_6: _mode_sense,
    Opcode.MODE_SENSE_10: _mode_sense,
}
