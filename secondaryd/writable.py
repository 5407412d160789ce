"""The S-VOLs written by hosts (SSWS): every write marks the secondary's difference bitmap,
so a later resync knows what this site changed. The NBD WriteJournal hook for that role."""

from __future__ import annotations

from collections.abc import Mapping

from common.bitmap import DifferenceBitmap


class BitmapMarker:
    def __init__(self, bitmaps: Mapping[str, DifferenceBitmap]) -> None:
        self.bitmaps = bitmaps
        self.marks = 0  # host writes marked (the group persists "written while SSWS")

    def wrote(self, volume: str, offset: int, payload: bytes | memoryview) -> None:
        self._mark(volume, offset, len(payload))

    def trimmed(self, volume: str, offset: int, length: int) -> None:
        self._mark(volume, offset, length)

    def zeroed(self, volume: str, offset: int, length: int) -> None:
        self._mark(volume, offset, length)

    def failed(self, volume: str, offset: int, length: int) -> None:
        self._mark(volume, offset, length)

    def _mark(self, volume: str, offset: int, length: int) -> None:
        self.bitmaps[volume].mark(offset, length)
        self.marks += 1

    def flush_records(self) -> None:
        """Marks live in memory and are saved every second (SecondaryGroup)."""

    async def sync(self) -> None:
        """FLUSH on an S-VOL: the volume's own fdatasync is the NBD server's part."""
