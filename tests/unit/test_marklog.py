"""The mark log: marks not in a saved bitmap yet survive a killed process, and only those."""

from __future__ import annotations

from pathlib import Path

from common.bitmap import DifferenceBitmap
from common.marklog import FILE_NAME, MarkLog

REGION = 64 * 1024
SIZE = 64 * REGION


def bitmaps() -> dict[str, DifferenceBitmap]:
    return {"vol0": DifferenceBitmap(SIZE), "vol1": DifferenceBitmap(SIZE)}


def test_flushed_marks_are_replayed_after_a_kill(tmp_path: Path) -> None:
    before = bitmaps()
    log = MarkLog(tmp_path, before)
    log.mark("vol0", 3 * REGION + 5, 10)
    log.mark("vol1", 0, 3 * REGION)
    log.flush()
    log.mark("vol0", 9 * REGION, 1)  # never flushed: its write never reached the volume
    # killed here: no close, the file holds what flush() wrote
    after = bitmaps()
    assert MarkLog(tmp_path, after).replay() == 2
    assert [r for r, _ in after["vol0"].runs()] == [3 * REGION]
    assert list(after["vol1"].runs()) == [(0, 3 * REGION)]


def test_saved_empties_the_log(tmp_path: Path) -> None:
    log = MarkLog(tmp_path, bitmaps())
    log.mark("vol0", 0, 1)
    log.flush()
    log.saved()
    assert (tmp_path / FILE_NAME).stat().st_size == 0
    assert MarkLog(tmp_path, bitmaps()).replay() == 0


def test_the_first_mark_after_a_save_is_logged_even_into_a_marked_region(
    tmp_path: Path,
) -> None:
    maps = bitmaps()
    maps["vol0"].mark(0, REGION)  # e.g. marked at suspension, then saved
    log = MarkLog(tmp_path, maps)
    log.saved()
    log.mark("vol0", 4096, 4096)  # a host write into it: proof hosts wrote since the save
    log.flush()
    assert MarkLog(tmp_path, bitmaps()).replay() == 1


def test_a_mark_already_set_is_not_logged_again(tmp_path: Path) -> None:
    log = MarkLog(tmp_path, bitmaps())
    log.mark("vol0", 0, 4096)
    log.flush()
    size = (tmp_path / FILE_NAME).stat().st_size
    log.mark("vol0", 8192, 4096)  # same region
    log.flush()
    assert (tmp_path / FILE_NAME).stat().st_size == size


def test_a_torn_tail_and_a_foreign_entry_are_ignored(tmp_path: Path) -> None:
    log = MarkLog(tmp_path, bitmaps())
    log.mark("vol0", REGION, 1)
    log.flush()
    log.close()
    with open(tmp_path / FILE_NAME, "ab") as file:
        file.write(b"\x04vol9" + (0).to_bytes(8, "little") + (1).to_bytes(8, "little"))
        file.write(b"\x04vol0\x00\x00")  # killed mid-append
    after = bitmaps()
    assert MarkLog(tmp_path, after).replay() == 1
    assert [r for r, _ in after["vol0"].runs()] == [REGION]
