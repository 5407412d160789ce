"""Difference bitmaps: marks, runs against a naive model, merge, the untrusted serialized form."""

from __future__ import annotations

import contextlib
import struct
import time
from pathlib import Path

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bitmap import BitmapError, DifferenceBitmap

KiB = 1024
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
RB = 64 * KiB


def marked_regions(bitmap: DifferenceBitmap) -> list[int]:
    return [r for r in range(bitmap.regions) if bitmap.is_marked(r * bitmap.region_bytes)]


def naive_runs(regions: set[int], region_bytes: int, volume_size: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for r in sorted(regions):
        start, end = r * region_bytes, min((r + 1) * region_bytes, volume_size)
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end - runs[-1][0])
        else:
            runs.append((start, end - start))
    return runs


# -- geometry and marking ----------------------------------------------------


def test_geometry() -> None:
    bitmap = DifferenceBitmap(GiB)
    assert (bitmap.volume_size, bitmap.region_bytes, bitmap.regions) == (GiB, RB, 16384)
    assert len(bitmap.to_bytes()) - 36 == 2 * KiB  # 2 KiB of bits per GiB
    assert DifferenceBitmap(3 * RB + 1).regions == 4
    assert DifferenceBitmap(0).regions == 0


@pytest.mark.parametrize("region_bytes", [0, 2048, 4096 + 512, 3 * 65536, -65536])
def test_region_size_must_be_a_power_of_two_of_at_least_4k(region_bytes: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        DifferenceBitmap(GiB, region_bytes)


def test_mark_at_region_boundaries() -> None:
    bitmap = DifferenceBitmap(16 * RB)
    bitmap.mark(RB - 1, 1)
    assert marked_regions(bitmap) == [0]
    bitmap.mark(2 * RB - 1, 2)  # one byte on each side of a boundary
    assert marked_regions(bitmap) == [0, 1, 2]
    bitmap.mark(4 * RB, RB)  # exactly one region
    assert marked_regions(bitmap) == [0, 1, 2, 4]
    bitmap.mark(7 * RB, 0)
    assert marked_regions(bitmap) == [0, 1, 2, 4]
    bitmap.mark(6 * RB, 3 * RB + 1)  # crosses a byte of bits: regions 6..9
    assert marked_regions(bitmap) == [0, 1, 2, 4, 6, 7, 8, 9]
    assert bitmap.dirty_regions == 8
    assert bitmap.dirty_bytes == 8 * RB


def test_last_partial_region() -> None:
    size = 10 * RB + 100
    bitmap = DifferenceBitmap(size)
    bitmap.mark(size - 1, 1)
    assert marked_regions(bitmap) == [10]
    assert bitmap.dirty_bytes == 100
    assert list(bitmap.runs()) == [(10 * RB, 100)]
    bitmap.mark(0, size)
    assert bitmap.dirty_regions == 11
    assert bitmap.dirty_bytes == size
    assert list(bitmap.runs()) == [(0, size)]
    bitmap.mark(size, 0)  # an empty range at the very end is in range


@pytest.mark.parametrize(
    ("offset", "length"), [(-1, 1), (0, -1), (GiB, 1), (GiB - 1, 2), (0, GiB + 1)]
)
def test_out_of_range_is_our_bug(offset: int, length: int) -> None:
    bitmap = DifferenceBitmap(GiB)
    with pytest.raises(ValueError, match="outside volume"):
        bitmap.mark(offset, length)
    with pytest.raises(ValueError, match="outside volume"):
        bitmap.is_marked(GiB)
    assert bitmap.dirty_regions == 0


def test_huge_ranges_are_fast() -> None:
    bitmap = DifferenceBitmap(4 * TiB)  # 2**26 regions: a loop per bit would take many seconds
    started = time.perf_counter()
    bitmap.mark(RB + 1, 4 * TiB - 2 * RB)
    assert bitmap.dirty_regions == 2**26 - 1
    assert list(bitmap.runs()) == [(RB, 4 * TiB - RB)]
    assert sum(1 for _ in bitmap.runs(max_run_bytes=GiB)) == 4096
    bitmap.clear_all()
    bitmap.mark(3 * TiB, 1)
    bitmap.mark(TiB - 1, 2)
    assert list(bitmap.runs()) == [(TiB - RB, 2 * RB), (3 * TiB, RB)]  # sparse: skips zeroes
    bitmap.mark_all()
    assert bitmap.dirty_bytes == 4 * TiB
    assert time.perf_counter() - started < 5


# -- clear -------------------------------------------------------------------


def test_clear_copied_regions() -> None:
    size = 20 * RB + 4096
    bitmap = DifferenceBitmap(size)
    bitmap.mark_all()
    bitmap.clear(RB, 3 * RB)
    bitmap.clear(20 * RB, 4096)  # the last, partial region: its end is the volume's end
    assert marked_regions(bitmap) == [0, *range(4, 20)]
    bitmap.clear(0, 0)
    for offset, length in list(bitmap.runs(max_run_bytes=5 * RB)):
        bitmap.clear(offset, length)
    assert bitmap.dirty_regions == 0


@pytest.mark.parametrize(("offset", "length"), [(1, RB - 1), (0, RB + 1), (RB, 100)])
def test_clear_of_a_partly_copied_region_is_refused(offset: int, length: int) -> None:
    bitmap = DifferenceBitmap(8 * RB)
    bitmap.mark_all()
    with pytest.raises(ValueError, match="not aligned"):
        bitmap.clear(offset, length)
    assert bitmap.dirty_regions == 8


# -- runs against a naive model ----------------------------------------------

geometries = st.tuples(
    st.sampled_from([4096, 8192, 65536]),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=4095),
).map(lambda g: (g[0], g[0] * g[1] + g[2]))


@st.composite
def marked(draw: st.DrawFn) -> tuple[DifferenceBitmap, set[int]]:
    region_bytes, size = draw(geometries)
    bitmap = DifferenceBitmap(size, region_bytes)
    model: set[int] = set()
    for _ in range(draw(st.integers(min_value=0, max_value=12))):
        if size == 0:
            break
        offset = draw(st.integers(min_value=0, max_value=size - 1))
        length = draw(
            st.one_of(
                st.integers(min_value=0, max_value=min(size - offset, 3 * region_bytes)),
                st.integers(min_value=0, max_value=size - offset),
            )
        )
        if draw(st.booleans()) or not length:
            bitmap.mark(offset, length)
            if length:
                model |= set(
                    range(offset // region_bytes, (offset + length - 1) // region_bytes + 1)
                )
        else:  # clear the whole regions inside the drawn range
            lo = -(-offset // region_bytes)
            hi = (offset + length) // region_bytes
            if (offset + length) == size:
                hi = bitmap.regions
            if lo < hi:
                bitmap.clear(lo * region_bytes, min(hi * region_bytes, size) - lo * region_bytes)
                model -= set(range(lo, hi))
    return bitmap, model


@settings(max_examples=300)
@given(marked())
def test_marks_match_a_naive_model(case: tuple[DifferenceBitmap, set[int]]) -> None:
    bitmap, model = case
    assert marked_regions(bitmap) == sorted(model)
    assert bitmap.dirty_regions == len(model)
    assert bitmap.dirty_bytes == sum(length for _, length in bitmap.runs())


@settings(max_examples=300)
@given(marked(), st.integers(min_value=1, max_value=20))
def test_runs_match_a_naive_model(
    case: tuple[DifferenceBitmap, set[int]], max_regions: int
) -> None:
    bitmap, model = case
    expected = naive_runs(model, bitmap.region_bytes, bitmap.volume_size)
    assert list(bitmap.runs()) == expected
    max_run_bytes = max_regions * bitmap.region_bytes + bitmap.region_bytes // 2
    pieces = list(bitmap.runs(max_run_bytes=max_run_bytes))
    assert all(0 < length <= max_regions * bitmap.region_bytes for _, length in pieces)
    assert all(offset % bitmap.region_bytes == 0 for offset, _ in pieces)
    covered = {
        r
        for o, n in pieces
        for r in range(o // bitmap.region_bytes, -(-(o + n) // bitmap.region_bytes))
    }
    assert covered == model
    rejoined: list[tuple[int, int]] = []
    for offset, length in pieces:
        if rejoined and sum(rejoined[-1]) == offset:
            rejoined[-1] = (rejoined[-1][0], rejoined[-1][1] + length)
        else:
            rejoined.append((offset, length))
    assert rejoined == expected


def test_runs_refuse_a_max_below_one_region() -> None:
    bitmap = DifferenceBitmap(GiB)
    bitmap.mark_all()
    with pytest.raises(ValueError, match="less than one region"):
        list(bitmap.runs(max_run_bytes=RB - 1))


# -- merge -------------------------------------------------------------------


def test_merge_is_a_union() -> None:
    size = 100 * RB + 7
    mine, theirs = DifferenceBitmap(size), DifferenceBitmap(size)
    mine.mark(0, RB)
    mine.mark(50 * RB, 1)
    theirs.mark(RB, 1)
    theirs.mark(size - 1, 1)
    mine.merge(theirs)
    assert marked_regions(mine) == [0, 1, 50, 100]
    assert marked_regions(theirs) == [1, 100]


def test_merge_of_other_geometry_is_refused() -> None:
    bitmap = DifferenceBitmap(GiB)
    with pytest.raises(ValueError, match="different geometry"):
        bitmap.merge(DifferenceBitmap(GiB + RB))
    with pytest.raises(ValueError, match="different geometry"):
        bitmap.merge(DifferenceBitmap(GiB, 2 * RB))


def test_needs_save_tracks_real_changes(tmp_path: Path) -> None:
    bitmap = DifferenceBitmap(GiB)
    assert bitmap.needs_save  # never saved
    bitmap.save(tmp_path / "bm")
    assert not bitmap.needs_save
    bitmap.mark(0, 1)
    assert bitmap.needs_save
    bitmap.save(tmp_path / "bm")
    bitmap.mark(100, 1000)  # same region: nothing new to save
    bitmap.merge(DifferenceBitmap(GiB))
    bitmap.clear(RB, RB)
    assert not bitmap.needs_save
    bitmap.clear(0, RB)
    assert bitmap.needs_save
    bitmap.save(tmp_path / "bm")
    other = DifferenceBitmap(GiB)
    other.mark(GiB - 1, 1)
    bitmap.merge(other)
    assert bitmap.needs_save


# -- serialized form ---------------------------------------------------------


@given(marked())
def test_to_bytes_round_trip(case: tuple[DifferenceBitmap, set[int]]) -> None:
    bitmap, model = case
    data = bitmap.to_bytes()
    decoded = DifferenceBitmap.from_bytes(data, bitmap.volume_size, bitmap.region_bytes)
    assert marked_regions(decoded) == sorted(model)
    assert decoded.to_bytes() == data
    assert len(data) == DifferenceBitmap.serialized_size(bitmap.volume_size, bitmap.region_bytes)


def sample_serialized() -> tuple[bytes, int]:
    size = 21 * 4096 + 5  # 22 regions: 3 bytes of bits, the last one partly used
    bitmap = DifferenceBitmap(size, 4096)
    bitmap.mark(0, 1)
    bitmap.mark(9 * 4096, 3 * 4096)
    bitmap.mark(size - 1, 1)
    return bitmap.to_bytes(), size


def test_every_truncation_is_a_bitmap_error() -> None:
    data, size = sample_serialized()
    for cut in range(len(data)):
        with pytest.raises(BitmapError, match="truncated"):
            DifferenceBitmap.from_bytes(data[:cut], size, 4096)
    with pytest.raises(BitmapError, match="trailing bytes"):
        DifferenceBitmap.from_bytes(data + b"\x00", size, 4096)


def test_every_single_byte_change_is_a_bitmap_error() -> None:
    data, size = sample_serialized()
    messages = set()
    for index in range(len(data)):
        for flip in range(1, 256):
            corrupt = bytearray(data)
            corrupt[index] ^= flip
            with pytest.raises(BitmapError) as info:
                DifferenceBitmap.from_bytes(bytes(corrupt), size, 4096)
            messages.add(str(info.value).split(":")[0].split(" ")[0])
    assert messages == {"bad", "unsupported", "geometry", "crc"}


@settings(max_examples=500)
@given(st.binary(max_size=80), st.sampled_from([0, 4096, 21 * 4096 + 5]))
def test_arbitrary_input_raises_only_bitmap_error(data: bytes, size: int) -> None:
    with contextlib.suppress(BitmapError):
        DifferenceBitmap.from_bytes(data, size, 4096)


def test_geometry_mismatch_with_the_config() -> None:
    data, size = sample_serialized()
    with pytest.raises(BitmapError, match=f"geometry mismatch: bitmap is for {size} bytes"):
        DifferenceBitmap.from_bytes(data, size + 4096, 4096)
    with pytest.raises(
        BitmapError, match=r"in 4096-byte regions, config says \d+ bytes in 8192-byte"
    ):
        DifferenceBitmap.from_bytes(data, size, 8192)


def test_bits_past_the_last_region_are_refused_even_with_a_good_crc() -> None:
    data, size = sample_serialized()
    forged = bytearray(data)
    forged[-1] |= 0x80  # region 23 of a 22-region volume
    crc = crc32c.crc32c(bytes(forged[36:]), crc32c.crc32c(bytes(forged[:32])))
    struct.pack_into("<I", forged, 32, crc)
    with pytest.raises(BitmapError, match="bits set past the last region"):
        DifferenceBitmap.from_bytes(bytes(forged), size, 4096)


# -- files -------------------------------------------------------------------


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "vol0.bitmap"
    bitmap = DifferenceBitmap(GiB + 4096)
    bitmap.mark(5 * MiB, 3 * MiB)
    bitmap.mark(GiB, 4096)
    bitmap.save(path)
    loaded = DifferenceBitmap.load(path, GiB + 4096)
    assert list(loaded.runs()) == [(5 * MiB, 3 * MiB), (GiB, 4096)]
    assert not loaded.needs_save
    again, existed = DifferenceBitmap.load_or_new(path, GiB + 4096)
    assert existed
    assert again.to_bytes() == bitmap.to_bytes()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "vol0.bitmap"
    bitmap, existed = DifferenceBitmap.load_or_new(path, GiB)
    assert not existed
    assert bitmap.dirty_regions == 0
    assert bitmap.needs_save
    with pytest.raises(BitmapError, match=f"bitmap file {path}: missing"):
        DifferenceBitmap.load(path, GiB)


def test_bad_files_are_bitmap_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vol0.bitmap"
    DifferenceBitmap(GiB).save(path)
    with pytest.raises(BitmapError, match=f"bitmap file {path}: geometry mismatch"):
        DifferenceBitmap.load(path, 2 * GiB)
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BitmapError, match=f"bitmap file {path}: crc mismatch"):
        DifferenceBitmap.load(path, GiB)
    path.write_bytes(bytes(1 << 20))
    with pytest.raises(BitmapError, match=f"read state file {path}: larger than"):
        DifferenceBitmap.load_or_new(path, GiB)
    with pytest.raises(BitmapError, match=f"read state file {tmp_path}: Is a directory"):
        DifferenceBitmap.load(tmp_path, GiB)


def test_save_failure_is_a_bitmap_error(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "vol0.bitmap"
    with pytest.raises(BitmapError, match=f"create state file {path}.tmp"):
        DifferenceBitmap(GiB).save(path)


def test_decode_reads_the_region_size_from_the_header() -> None:
    small = DifferenceBitmap(1 << 20, 4096)
    small.mark(8192, 100)
    decoded = DifferenceBitmap.decode(small.to_bytes(), 1 << 20)
    assert decoded.region_bytes == 4096 and list(decoded.runs()) == [(8192, 4096)]
    with pytest.raises(BitmapError, match="geometry"):
        DifferenceBitmap.decode(small.to_bytes(), 2 << 20)


def test_regridding_never_loses_a_marked_byte() -> None:
    fine = DifferenceBitmap(1 << 20, 4096)
    fine.mark(4096 * 17, 1)
    fine.mark((1 << 20) - 4096, 4096)
    coarse = fine.regridded(65536)
    assert list(coarse.runs()) == [(65536, 65536), ((1 << 20) - 65536, 65536)]
    back = coarse.regridded(4096)  # finer again: the whole coarse regions stay marked
    assert back.dirty_bytes == 2 * 65536


def test_union_into_a_bitmap_of_another_region_size() -> None:
    theirs = DifferenceBitmap(1 << 20, 4096)
    theirs.mark(0, 1)
    mine = DifferenceBitmap(1 << 20, 65536)
    mine.mark(65536 * 3, 1)
    theirs.union_into(mine)
    assert list(mine.runs()) == [(0, 65536), (65536 * 3, 65536)]


def test_a_bitmap_saved_in_another_region_size_is_converted(tmp_path: Path) -> None:
    saved = DifferenceBitmap(1 << 20, 65536)
    saved.mark(70000, 1)
    saved.save(tmp_path / "v.bitmap")
    loaded, existed = DifferenceBitmap.load_or_new(tmp_path / "v.bitmap", 1 << 20, 4096)
    assert existed and loaded.region_bytes == 4096 and loaded.needs_save
    assert list(loaded.runs()) == [(65536, 65536)]
