"""The S-VOLs written by hosts (SSWS): every write marks the secondary's difference bitmap,
so a later resync knows what this site changed. The NBD WriteJournal hook for that role."""

from __future__ import annotations

from common.marklog import MarkLog


class BitmapMarker:
    def __init__(self, log: MarkLog) -> None:
        self.log = log
        self.marks = 0  # host writes marked (the group persists "written while SSWS")
        self.ack_delay_s = 0.0  # no inflow control on an SSWS secondary

    def wrote(self, volume: str, offset: int, payload: bytes | memoryview) -> None:
        self._mark(volume, offset, len(payload))

    def trimmed(self, volume: str, offset: int, length: int) -> None:
        self._mark(volume, offset, length)

    def zeroed(self, volume: str, offset: int, length: int) -> None:
        self._mark(volume, offset, length)

    def failed(self, volume: str, offset: int, length: int) -> None:
        self._mark(volume, offset, length)

    def _mark(self, volume: str, offset: int, length: int) -> None:
        self.log.mark(volume, offset, length)
        self.marks += 1

    def flush_records(self) -> None:
        """New marks into the mark log before the batch's writes reach the S-VOLs (the
        bitmaps themselves are saved every second by SecondaryGroup)."""
        self.log.flush()

    async def sync(self) -> None:
        """FLUSH on an S-VOL: the volume's own fdatasync is the NBD server's part."""
