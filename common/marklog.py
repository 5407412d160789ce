"""The mark log: difference-bitmap marks that are not in a saved bitmap yet, kept on file.

Bitmaps live in memory and are saved about once a second; a killed daemon would lose the
marks of its last second, and a resync would then skip regions hosts wrote (invariant 2).
So every new mark is also appended here, and the NBD server writes the log (one write per
request batch, like the journal's records) *before* the batch's data reaches a volume:

    host write ─► mark(volume, offset, length): bitmap bit + a pending entry
    flush()    ─► pending entries appended to data_dir/bitmaps/marks.log (page cache: a killed
                  process does not lose them) ─► then the volume I/O
    saved()    ─► after the bitmaps were saved (fsynced): the log is emptied
    replay()   ─► at start, before anything is served: entries re-marked, bitmaps saved, log
                  emptied; a torn entry at the end (killed mid-append) is ignored

A power loss can lose the log's page cache too; a primary detects that case (boot id) and
marks every region. Entry: u8 name length, name (UTF-8), u64 offset, u64 length (little
endian). Loop thread only.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from common.bitmap import DifferenceBitmap

__all__ = ["MarkLog"]

log = logging.getLogger("journalpair.bitmap")

FILE_NAME = "marks.log"
_RANGE = struct.Struct("<QQ")


class MarkLog:
    def __init__(self, directory: Path, bitmaps: Mapping[str, DifferenceBitmap]) -> None:
        self.path = directory / FILE_NAME
        self.bitmaps = bitmaps
        self._pending = bytearray()
        self._logged_since_save = False
        self._names = {
            name: len(name.encode()).to_bytes(1, "little") + name.encode() for name in bitmaps
        }
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        os.close(self._fd)

    def mark(self, volume: str, offset: int, length: int) -> None:
        bitmap = self.bitmaps[volume]
        if length <= 0:
            return
        if (
            self._logged_since_save
            and length <= bitmap.region_bytes
            and bitmap.is_marked(offset)
            and bitmap.is_marked(offset + length - 1)
        ):
            # Already marked (and logged or saved): the common case of rewrites. The first
            # mark after a save is always logged: a replayed entry also tells that hosts
            # wrote this site since (split-brain detection), even into marked regions.
            return
        self._logged_since_save = True
        bitmap.mark(offset, length)
        self._pending += self._names[volume]
        self._pending += _RANGE.pack(offset, length)

    def flush(self) -> None:
        """The pending entries into the file, before the writes that made them go out."""
        if self._pending:
            os.write(self._fd, self._pending)
            self._pending.clear()

    def saved(self) -> None:
        """The bitmaps were just saved with every mark so far: the log is not needed."""
        self._pending.clear()
        self._logged_since_save = False
        os.ftruncate(self._fd, 0)

    def replay(self) -> int:
        """Re-mark what the log holds (an unclean stop); returns the entries applied. The
        caller saves the bitmaps, then calls saved()."""
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        count, pos = 0, 0
        while pos < len(data):
            size = data[pos]
            end = pos + 1 + size + _RANGE.size
            if end > len(data):
                log.warning("mark log %s: torn entry at byte %d ignored", self.path, pos)
                break
            name = data[pos + 1 : pos + 1 + size].decode(errors="replace")
            offset, length = _RANGE.unpack_from(data, pos + 1 + size)
            bitmap = self.bitmaps.get(name)
            if bitmap is not None and offset + length <= bitmap.volume_size:
                bitmap.mark(offset, length)
                count += 1
            else:
                log.warning(
                    "mark log %s: entry for %s %d+%d does not fit; ignored",
                    self.path,
                    name,
                    offset,
                    length,
                )
            pos = end
        if count:
            log.warning(
                "the last stop was unclean: %d bitmap marks recovered from %s", count, self.path
            )
        return count
