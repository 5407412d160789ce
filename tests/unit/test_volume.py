"""Volume: sparse creation, refusal to resize, punch/zero, extents from SEEK_DATA/SEEK_HOLE."""

from pathlib import Path

import pytest

from common.volume import Volume, VolumeError, is_zeros

MiB = 1 << 20


def test_new_volume_is_sparse_and_sized(tmp_path: Path) -> None:
    vol = Volume.open_or_create("v", tmp_path / "v.img", 8 * MiB)
    try:
        st = (tmp_path / "v.img").stat()
        assert st.st_size == 8 * MiB
        assert st.st_blocks == 0
        assert [(e.offset, e.length, e.hole) for e in vol.extents(0, 8 * MiB)] == [
            (0, 8 * MiB, True)
        ]
    finally:
        vol.close()


def test_existing_file_of_other_size_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(b"x" * 4096)
    with pytest.raises(VolumeError, match="refusing to resize"):
        Volume.open_or_create("v", path, 8 * MiB)
    assert path.read_bytes() == b"x" * 4096


def test_write_read_punch_and_extents(tmp_path: Path) -> None:
    vol = Volume.open_or_create("v", tmp_path / "v.img", 8 * MiB)
    try:
        vol.write(MiB, b"\xab" * MiB)
        assert vol.read(MiB, 4096) == b"\xab" * 4096
        runs = [(e.offset, e.length, e.hole) for e in vol.extents(0, 8 * MiB)]
        assert runs == [(0, MiB, True), (MiB, MiB, False), (2 * MiB, 6 * MiB, True)]
        vol.punch(MiB, 64 * 1024)
        assert vol.read(MiB, 64 * 1024) == bytes(64 * 1024)
        assert vol.extents(MiB, 64 * 1024)[0].hole
        vol.zero(MiB + 64 * 1024, 4096, allocate=True)
        assert vol.read(MiB + 64 * 1024, 4096) == bytes(4096)
        assert not vol.extents(MiB + 64 * 1024, 4096)[0].hole
        assert len(vol.extents(0, 8 * MiB, max_extents=2)) == 2
        vol.sync()
    finally:
        vol.close()


@pytest.mark.parametrize(
    ("data", "zeros"),
    [
        (b"", True),
        (bytes(1 << 20), True),
        (bytes(4095) + b"\x01", False),
        (b"\x01" + bytes(9), False),
    ],
)
def test_is_zeros(data: bytes, zeros: bool) -> None:
    assert is_zeros(data) is zeros
