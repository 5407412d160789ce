"""Journal record codec: round trips, and hostile input yields only the two record errors."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.journal.record import (
    FLAG_BASE,
    FLAG_REF,
    HEADER_BYTES,
    MAX_WRITE_BYTES,
    CorruptRecord,
    Op,
    TruncatedRecord,
    check_record,
    decode_header,
    decode_record,
    encode_record,
    iter_records,
    parse_header,
    peek_header,
    record_size,
)

NAME_255 = "é" * 127 + "x"  # 255 bytes of UTF-8, 128 characters


def write(seq: int, payload: bytes = b"hello", volume: str = "vol0", offset: int = 4096) -> bytes:
    return encode_record(seq, volume, Op.WRITE, offset, len(payload), payload, 1_700_000_000_123)


@pytest.mark.parametrize(
    ("op", "length", "payload", "flags"),
    [
        (Op.WRITE, 5, b"abcde", 0),
        (Op.WRITE, 0, b"", 0),
        (Op.WRITE, 4096, bytes(range(256)) * 16, FLAG_BASE),
        (Op.TRIM, 1 << 20, b"", 0),
        (Op.ZERO, (1 << 32) - 1, b"", FLAG_BASE),
    ],
)
@pytest.mark.parametrize("volume", ["", "vol0", NAME_255])
def test_every_op_round_trips(op: Op, length: int, payload: bytes, flags: int, volume: str) -> None:
    record = encode_record(77, volume, op, 512, length, payload, 123456789, flags)
    assert len(record) == record_size(volume, len(payload))
    entry, end = decode_record(record)
    assert end == len(record) == entry.record_bytes
    assert (entry.seq, entry.volume, entry.op, entry.offset, entry.length) == (
        77,
        volume,
        op,
        512,
        length,
    )
    assert (entry.timestamp_ns, entry.flags, bytes(entry.payload)) == (123456789, flags, payload)
    assert decode_header(record) == (77, len(record)) == peek_header(record)
    assert check_record(record) == (77, len(record))


def test_largest_write_round_trips_without_copying_the_payload() -> None:
    payload = b"\x5a" * MAX_WRITE_BYTES
    record = encode_record(1, "v", Op.WRITE, 0, MAX_WRITE_BYTES, payload, 0)
    entry, _ = decode_record(record)
    assert entry.payload.obj is record
    assert entry.payload == payload


def test_record_at_an_offset_inside_a_blob_and_iter_records() -> None:
    records = [write(5), write(6, b"x" * 1000), encode_record(7, "v1", Op.TRIM, 0, 8, b"", 9)]
    blob = b"".join(records)
    entry, end = decode_record(blob, len(records[0]))
    assert (entry.seq, end) == (6, len(records[0]) + len(records[1]))
    assert [e.seq for e in iter_records(blob)] == [5, 6, 7]
    assert list(iter_records(b"")) == []
    with pytest.raises(TruncatedRecord):
        list(iter_records(blob[:-1]))
    with pytest.raises(CorruptRecord):
        list(iter_records(blob + b"\0" * HEADER_BYTES))


@pytest.mark.parametrize(
    ("volume", "op", "length", "payload", "flags", "match"),
    [
        ("x" * 256, Op.WRITE, 1, b"a", 0, "volume name"),
        ("v", Op.WRITE, 2, b"a", 0, "payload bytes"),
        ("v", Op.TRIM, 1, b"a", 0, "payload bytes"),
        ("v", Op.WRITE, MAX_WRITE_BYTES + 1, b"", 0, "at most"),
        ("v", Op.ZERO, 1, b"", 0x80, "unknown flags"),
        ("v", Op.ZERO, 1 << 32, b"", 0, "out of range"),
    ],
)
def test_encode_refuses_what_cannot_be_a_record(
    volume: str, op: Op, length: int, payload: bytes, flags: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode_record(1, volume, op, 0, length, payload, 0, flags)


@pytest.mark.parametrize(
    "record", [write(9, b"payload!", "vol0"), encode_record(3, NAME_255, Op.ZERO, 0, 9, b"", 1)]
)
def test_every_prefix_is_truncated_and_says_what_it_needs(record: bytes) -> None:
    for cut in range(len(record)):
        with pytest.raises(TruncatedRecord) as info:
            decode_record(record[:cut])
        assert cut < info.value.need_bytes <= len(record)
    # Once the header and name are in, the whole record's size is known.
    with pytest.raises(TruncatedRecord) as info:
        decode_record(record[:-1])
    assert info.value.need_bytes == len(record)


@pytest.mark.parametrize(
    "record", [write(9, b"payload!", "vol0"), encode_record(3, "vü", Op.TRIM, 0, 9, b"", 1)]
)
def test_every_single_byte_corruption_is_detected(record: bytes) -> None:
    for pos in range(len(record)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(record)
            damaged[pos] ^= flip
            with pytest.raises(CorruptRecord):
                decode_record(damaged)


def test_decode_header_skips_the_payload_crc() -> None:
    damaged = bytearray(write(4, b"abcdef"))
    damaged[-1] ^= 1
    assert decode_header(damaged) == (4, len(damaged))
    assert parse_header(damaged).op is Op.WRITE
    with pytest.raises(CorruptRecord, match="payload crc mismatch at seq 4"):
        decode_record(damaged)


def test_corrupt_messages_say_what_and_where() -> None:
    blob = write(1) + b"JPRX" + bytes(60)
    with pytest.raises(CorruptRecord, match=f"bad magic .* at pos {len(write(1))}"):
        list(iter_records(blob))
    damaged = bytearray(write(8))
    damaged[5] = 9  # op
    with pytest.raises(CorruptRecord, match="impossible header at seq 8 pos 0: unknown op 9"):
        decode_record(damaged)


def test_garbage_shorter_than_a_header_fails_fast_on_magic() -> None:
    with pytest.raises(CorruptRecord):
        decode_record(b"JQ")
    with pytest.raises(TruncatedRecord):
        decode_record(b"JP")


# Half the inputs start like a record, so that decoding gets past the magic.
HOSTILE = st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: b"JPRC\x01" + b))


@given(HOSTILE, st.integers(min_value=0, max_value=8))
def test_random_bytes_raise_only_record_errors(data: bytes, pos: int) -> None:
    for decode in (decode_record, decode_header, check_record, parse_header):
        with contextlib.suppress(TruncatedRecord, CorruptRecord):
            decode(data, pos)
    with contextlib.suppress(TruncatedRecord, CorruptRecord):
        list(iter_records(data))


@given(
    st.binary(max_size=64),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255))),
)
def test_damaged_records_raise_only_record_errors(
    payload: bytes, flips: list[tuple[int, int]]
) -> None:
    record = bytearray(write(12, payload, "vol1"))
    for where, flip in flips:
        record[where % len(record)] ^= flip
    try:
        entry, _ = decode_record(record)
    except (TruncatedRecord, CorruptRecord):
        return
    assert (entry.seq, bytes(entry.payload)) == (12, payload)  # the flips cancelled out


def test_a_reference_record_is_a_base_write_without_payload() -> None:
    record = encode_record(9, "vol0", Op.WRITE, 4096, 1 << 20, b"", 0, FLAG_BASE | FLAG_REF)
    entry, end = decode_record(record)
    assert end == len(record) == HEADER_BYTES + len("vol0")
    assert (entry.op, entry.length, len(entry.payload)) == (Op.WRITE, 1 << 20, 0)


@pytest.mark.parametrize(
    ("op", "flags", "payload"),
    [
        (Op.TRIM, FLAG_BASE | FLAG_REF, b""),  # only a WRITE refers to data
        (Op.WRITE, FLAG_REF, b""),  # only the copy's base records do
        (Op.WRITE, FLAG_BASE | FLAG_REF, b"x" * 16),  # it carries no payload
    ],
)
def test_a_reference_record_other_than_a_base_write_is_refused(
    op: Op, flags: int, payload: bytes
) -> None:
    with pytest.raises(ValueError):
        encode_record(1, "vol0", op, 0, 16, payload, 0, flags)
