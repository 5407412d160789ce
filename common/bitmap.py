"""Difference bitmaps: one bit per region of a volume, set for regions that changed while the
pair could not journal them (suspended, journal full, unclean restart), so a resync copies only
those regions.

Bit i stands for bytes [i * region_bytes, (i + 1) * region_bytes) of the volume, the last region
clamped at the volume's end. Bits are stored least significant first: region i is bit (i % 8) of
byte (i // 8), so `int.from_bytes(bits, "little")` has bit i for region i. Bits past the last
region are always zero.

Serialized form (`to_bytes`; also what the secondary sends to the primary for a resync, so
`from_bytes` trusts nothing in it):

    offset  size  field
    0       8     magic b"JPBITMAP"
    8       4     version (1), little endian like every field
    12      4     reserved, zero
    16      8     volume_size
    24      8     region_bytes
    32      4     crc32c of bytes 0..31 and of the bits
    36      n     bits, n = ceil(regions / 8)

Memory: one bit per 64 KiB region is 2 KiB per GiB of volume.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import crc32c

from common import statefile

log = logging.getLogger("journalpair.bitmap")

__all__ = ["REGION_BYTES_DEFAULT", "REGION_BYTES_MIN", "BitmapError", "DifferenceBitmap"]

REGION_BYTES_DEFAULT = 64 * 1024
REGION_BYTES_MIN = 4096

_MAGIC = b"JPBITMAP"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
_CRC = struct.Struct("<I")
_PREFIX_BYTES = _HEADER.size + _CRC.size

# Searching a bytearray with a one-byte class runs in C: this is how runs() skips clean (or
# fully dirty) stretches without a Python loop per byte.
_NONZERO_BYTE = re.compile(rb"[^\x00]")
_NOT_FULL_BYTE = re.compile(rb"[^\xff]")


class BitmapError(Exception):
    """A serialized bitmap (file or network) that is corrupt or does not fit the volume."""


def _lowest_bit(byte: int) -> int:
    return (byte & -byte).bit_length() - 1


class DifferenceBitmap:
    """One dirty bit per `region_bytes` of a `volume_size`-byte volume."""

    def __init__(self, volume_size: int, region_bytes: int = REGION_BYTES_DEFAULT) -> None:
        if volume_size < 0:
            raise ValueError(f"volume size {volume_size} is negative")
        if region_bytes < REGION_BYTES_MIN or region_bytes & (region_bytes - 1):
            raise ValueError(
                f"region size {region_bytes} is not a power of two >= {REGION_BYTES_MIN}"
            )
        self.volume_size = volume_size
        self.region_bytes = region_bytes
        self.regions = -(-volume_size // region_bytes)
        self._shift = region_bytes.bit_length() - 1
        self._bits = bytearray((self.regions + 7) // 8)
        # Nothing on disk matches a bitmap that was never saved or loaded.
        self.needs_save = True

    def __repr__(self) -> str:
        return (
            f"DifferenceBitmap(volume_size={self.volume_size}, region_bytes={self.region_bytes},"
            f" dirty_regions={self.dirty_regions})"
        )

    # -- marking -----------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Mark every region touched by [offset, offset+length); length 0 marks nothing."""
        self._check_range(offset, length)
        if length:
            self._fill(offset >> self._shift, ((offset + length - 1) >> self._shift) + 1, True)

    def clear(self, offset: int, length: int) -> None:
        """Clear the regions of [offset, offset+length), once they were copied.

        The range must start and end on region boundaries (or at the volume's end), as every
        run from `runs()` does: clearing a region that was only partly copied would lose the
        rest of its changes (invariant 2), so an unaligned range is a ValueError.
        """
        self._check_range(offset, length)
        end = offset + length
        if offset & (self.region_bytes - 1) or (
            end & (self.region_bytes - 1) and end != self.volume_size
        ):
            raise ValueError(
                f"clear [{offset}, {end}) is not aligned to {self.region_bytes}-byte regions"
            )
        if length:
            self._fill(offset >> self._shift, ((end - 1) >> self._shift) + 1, False)

    def mark_all(self) -> None:
        self._fill(0, self.regions, True)

    def clear_all(self) -> None:
        self._fill(0, self.regions, False)

    def merge(self, other: DifferenceBitmap) -> None:
        """OR `other` into this bitmap (the union resync copies); same geometry only."""
        if (other.volume_size, other.region_bytes) != (self.volume_size, self.region_bytes):
            raise ValueError(
                f"merge bitmaps of different geometry: {self.volume_size}/{self.region_bytes}"
                f" and {other.volume_size}/{other.region_bytes}"
            )
        mine = int.from_bytes(self._bits, "little")
        union = mine | int.from_bytes(other._bits, "little")
        if union != mine:
            self._bits[:] = union.to_bytes(len(self._bits), "little")
            self.needs_save = True

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.volume_size:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside volume of {self.volume_size} bytes"
            )

    def _fill(self, lo: int, hi: int, value: bool) -> None:
        """Set (or clear) the bits of regions [lo, hi): whole bytes by slice, ends by mask."""
        if lo >= hi:
            return
        bits = self._bits
        before = bits[lo >> 3 : ((hi - 1) >> 3) + 1]
        first_whole, end_whole = (lo + 7) >> 3, hi >> 3
        if first_whole > end_whole:  # lo and hi inside one byte, no byte boundary between
            self._mask(lo >> 3, ((1 << (hi - lo)) - 1) << (lo & 7), value)
        else:
            if lo & 7:
                self._mask(lo >> 3, (0xFF << (lo & 7)) & 0xFF, value)
            if end_whole > first_whole:
                fill = b"\xff" if value else b"\x00"
                bits[first_whole:end_whole] = fill * (end_whole - first_whole)
            if hi & 7:
                self._mask(end_whole, (1 << (hi & 7)) - 1, value)
        if bits[lo >> 3 : ((hi - 1) >> 3) + 1] != before:
            self.needs_save = True

    def _mask(self, index: int, mask: int, value: bool) -> None:
        if value:
            self._bits[index] |= mask
        else:
            self._bits[index] &= ~mask & 0xFF

    # -- queries -----------------------------------------------------------

    def is_marked(self, offset: int) -> bool:
        if not 0 <= offset < self.volume_size:
            raise ValueError(f"offset {offset} outside volume of {self.volume_size} bytes")
        region = offset >> self._shift
        return bool(self._bits[region >> 3] >> (region & 7) & 1)

    @property
    def dirty_regions(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    @property
    def dirty_bytes(self) -> int:
        """Bytes a resync would copy: dirty regions, the last one clamped at the volume's end."""
        total = self.dirty_regions * self.region_bytes
        if self.regions and self.is_marked(self.volume_size - 1):
            total -= self.regions * self.region_bytes - self.volume_size
        return total

    def runs(self, max_run_bytes: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) of each stretch of consecutive dirty regions, in volume order.

        Runs end at the volume's end and are cut into pieces of at most `max_run_bytes`,
        rounded down to whole regions so that every piece can be `clear`ed once copied.
        The bitmap must not change while the iterator is in use.
        """
        piece_regions = self.regions or 1
        if max_run_bytes is not None:
            if max_run_bytes < self.region_bytes:
                raise ValueError(
                    f"max run of {max_run_bytes} bytes is less than one region"
                    f" ({self.region_bytes} bytes)"
                )
            piece_regions = max_run_bytes >> self._shift
        region = 0
        while (start := self._next_region(region, _NONZERO_BYTE, 0)) < self.regions:
            end = min(self._next_region(start, _NOT_FULL_BYTE, 0xFF), self.regions)
            for lo in range(start, end, piece_regions):
                hi = min(lo + piece_regions, end)
                offset = lo << self._shift
                yield offset, min(hi << self._shift, self.volume_size) - offset
            region = end

    def _next_region(self, region: int, skip_until: re.Pattern[bytes], skip_byte: int) -> int:
        """First region >= `region` whose bit differs from `skip_byte`'s bits, else past the end.

        (For skip_byte 0 that is the next dirty region, for 0xFF the next clean one.)
        """
        index = region >> 3
        if index >= len(self._bits):
            return len(self._bits) * 8
        differ = (self._bits[index] ^ skip_byte) >> (region & 7)
        if differ:
            return region + _lowest_bit(differ)
        found = skip_until.search(self._bits, index + 1)
        if found is None:
            return len(self._bits) * 8
        index = found.start()
        return index * 8 + _lowest_bit(self._bits[index] ^ skip_byte)

    # -- serialized form ---------------------------------------------------

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(_MAGIC, _VERSION, 0, self.volume_size, self.region_bytes)
        crc = crc32c.crc32c(self._bits, crc32c.crc32c(header))
        return header + _CRC.pack(crc) + self._bits

    @classmethod
    def serialized_size(cls, volume_size: int, region_bytes: int = REGION_BYTES_DEFAULT) -> int:
        regions = -(-volume_size // region_bytes)
        return _PREFIX_BYTES + (regions + 7) // 8

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        volume_size: int,
        region_bytes: int = REGION_BYTES_DEFAULT,
    ) -> DifferenceBitmap:
        """Decode `to_bytes` output for a volume of this geometry; BitmapError if it is not."""
        bitmap = cls(volume_size, region_bytes)
        data = bytes(data)
        if len(data) < _PREFIX_BYTES:
            raise BitmapError(f"truncated: {len(data)} bytes, header needs {_PREFIX_BYTES}")
        magic, version, reserved, size, region = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise BitmapError(f"bad magic {magic!r}, expected {_MAGIC!r}")
        if version != _VERSION or reserved:
            raise BitmapError(f"unsupported version {version}.{reserved}, expected {_VERSION}.0")
        if (size, region) != (volume_size, region_bytes):
            raise BitmapError(
                f"geometry mismatch: bitmap is for {size} bytes in {region}-byte regions,"
                f" config says {volume_size} bytes in {region_bytes}-byte regions"
            )
        want = _PREFIX_BYTES + len(bitmap._bits)
        if len(data) != want:
            what = "truncated" if len(data) < want else "trailing bytes"
            raise BitmapError(f"{what}: {len(data)} bytes, expected {want}")
        bits = data[_PREFIX_BYTES:]
        (crc,) = _CRC.unpack_from(data, _HEADER.size)
        actual = crc32c.crc32c(bits, crc32c.crc32c(data[: _HEADER.size]))
        if crc != actual:
            raise BitmapError(f"crc mismatch: stored {crc:#010x}, computed {actual:#010x}")
        if bits and bits[-1] >> (bitmap.regions - 8 * (len(bits) - 1)):
            raise BitmapError("bits set past the last region")
        bitmap._bits[:] = bits
        return bitmap

    # -- files -------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the bitmap atomically and durably; BitmapError (naming the file) on failure."""
        try:
            statefile.write_bytes_atomic(path, self.to_bytes())
        except statefile.StateFileError as exc:
            raise BitmapError(str(exc)) from exc
        self.needs_save = False

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, volume_size: int) -> DifferenceBitmap:
        """Decode `to_bytes` output in whatever region size it was made with (the other site's,
        or this site's before a config change); BitmapError if it is not a bitmap of a volume
        of this size."""
        if len(data) < _HEADER.size:
            raise BitmapError(f"truncated: {len(data)} bytes, header needs {_PREFIX_BYTES}")
        region_bytes = _HEADER.unpack_from(data)[4]
        try:
            return cls.from_bytes(data, volume_size, region_bytes)
        except ValueError as exc:  # a region size the constructor refuses
            raise BitmapError(str(exc)) from None

    def regridded(self, region_bytes: int) -> DifferenceBitmap:
        """The same marks in regions of another size: every region of the new grid that
        overlaps a marked byte is marked (coarser grids mark more, never less)."""
        other = DifferenceBitmap(self.volume_size, region_bytes)
        for offset, length in self.runs():
            other.mark(offset, length)
        return other

    def union_into(self, other: DifferenceBitmap) -> None:
        """Mark in `other` (of any region size) every byte range marked here."""
        if other.region_bytes == self.region_bytes:
            other.merge(self)
        else:
            for offset, length in self.runs():
                other.mark(offset, length)

    @classmethod
    def load(
        cls, path: Path, volume_size: int, region_bytes: int = REGION_BYTES_DEFAULT
    ) -> DifferenceBitmap:
        """Read a saved bitmap; BitmapError naming the file when missing, unreadable or bad."""
        bitmap, existed = cls.load_or_new(path, volume_size, region_bytes)
        if not existed:
            raise BitmapError(f"bitmap file {path}: missing")
        return bitmap

    @classmethod
    def load_or_new(
        cls, path: Path, volume_size: int, region_bytes: int = REGION_BYTES_DEFAULT
    ) -> tuple[DifferenceBitmap, bool]:
        """(saved bitmap, True), or (clean bitmap, False) when no file exists.

        The caller decides what a missing file means: nothing changed, or (after an unclean
        stop, or for a volume never copied) everything must be marked.
        """
        # Saved with the smallest region size, the file is at most this large.
        most = cls.serialized_size(volume_size, REGION_BYTES_MIN)
        try:
            data = statefile.read_bytes(path, max_bytes=most)
        except statefile.StateFileError as exc:
            raise BitmapError(str(exc)) from exc
        if data is None:
            return cls(volume_size, region_bytes), False
        try:
            bitmap = cls.decode(data, volume_size)
        except BitmapError as exc:
            raise BitmapError(f"bitmap file {path}: {exc}") from exc
        if bitmap.region_bytes != region_bytes:  # the config's region size changed
            bitmap = bitmap.regridded(region_bytes)  # needs_save: saved in the new size
        else:
            bitmap.needs_save = False
        return bitmap, True


def bitmap_path(data_dir: Path, volume: str) -> Path:
    """Where a site keeps a volume's difference bitmap."""
    return data_dir / "bitmaps" / f"{volume}.bitmap"


def load_bitmaps(
    data_dir: Path, volume_sizes: Mapping[str, int], region_bytes: int = REGION_BYTES_DEFAULT
) -> dict[str, DifferenceBitmap]:
    """Each volume's bitmap from data_dir (a clean one where none was saved), in regions of
    `region_bytes` (one saved with another size is converted)."""
    (data_dir / "bitmaps").mkdir(exist_ok=True)
    return {
        name: _load_or_mark_all(bitmap_path(data_dir, name), size, region_bytes)
        for name, size in volume_sizes.items()
    }


def _load_or_mark_all(path: Path, volume_size: int, region_bytes: int) -> DifferenceBitmap:
    """A damaged bitmap file lists no region we can trust: it is renamed aside and every
    region is marked (the next resync copies the whole volume), rather than refusing to
    start (a loop under a supervisor) or trusting a clean one (a resync that skips)."""
    try:
        return DifferenceBitmap.load_or_new(path, volume_size, region_bytes)[0]
    except BitmapError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            path.rename(aside)
        except OSError as move_exc:
            raise BitmapError(f"{exc}; cannot move it aside: {move_exc}") from None
        log.error("%s; moved to %s: every region of the volume is marked", exc, aside.name)
        bitmap = DifferenceBitmap(volume_size, region_bytes)
        bitmap.mark_all()
        return bitmap


def save_bitmaps(data_dir: Path, bitmaps: Mapping[str, DifferenceBitmap]) -> None:
    """Save the bitmaps that changed. Call from one thread only (they share .tmp names)."""
    for name, bitmap in bitmaps.items():
        if bitmap.needs_save:
            bitmap.save(bitmap_path(data_dir, name))
