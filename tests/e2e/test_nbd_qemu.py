"""qemu-io and qemu-img (qemu-utils) against the exports: patterns, FUA, zeroes, discard."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    KiB,
    MiB,
    Volume,
    allocated_bytes,
    make_sparse_image,
    qemu_io,
    read_at,
    run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_qemu_io_writes_pattern_with_and_without_fua_and_reads_it_back(primary: Daemon) -> None:
    uri = primary.uri()
    qemu_io(uri, f"write -P 0xab 0 {MiB}", f"write -f -P 0xcd {MiB} {MiB}")

    qemu_io(uri, f"read -P 0xab 0 {MiB}", f"read -P 0xcd {MiB} {MiB}")
    # The check itself can fail: the wrong pattern is reported, and qemu-io exits 1.
    wrong = qemu_io(uri, f"read -P 0xcd 0 {MiB}", check=False)
    assert wrong.returncode == 1 and "Pattern verification failed" in wrong.stdout, wrong
    path = primary.volume().path
    assert read_at(path, 0, MiB) == b"\xab" * MiB
    assert read_at(path, MiB, MiB) == b"\xcd" * MiB


def test_qemu_io_pipelined_aio_writes_all_land(primary: Daemon) -> None:
    count, length = 32, 64 * KiB
    writes = [f"aio_write -q -P {0x10 + i} {i * length} {length}" for i in range(count)]
    qemu_io(primary.uri(), *writes, "aio_flush")

    reads = [f"read -q -P {0x10 + i} {i * length} {length}" for i in range(count)]
    qemu_io(primary.uri(), *reads)
    path = primary.volume().path
    for i in range(count):
        assert read_at(path, i * length, length) == bytes([0x10 + i]) * length, f"write {i}"


def test_qemu_io_write_zeroes_reads_back_zeros(primary: Daemon) -> None:
    uri = primary.uri()
    qemu_io(uri, f"write -P 0xab 0 {4 * MiB}")

    qemu_io(
        uri,
        f"write -z 0 {MiB}",  # WRITE_ZEROES with NO_HOLE
        f"write -z -u {MiB} {MiB}",  # may punch a hole
        f"write -z -u -n {2 * MiB} {MiB}",  # FAST_ZERO: no slow fallback allowed
    )

    qemu_io(uri, f"read -P 0 0 {3 * MiB}", f"read -P 0xab {3 * MiB} {MiB}")
    path = primary.volume().path
    assert read_at(path, 0, 3 * MiB) == bytes(3 * MiB)
    assert read_at(path, 3 * MiB, MiB) == b"\xab" * MiB


def test_qemu_io_discard_reads_back_zeros_and_punches_the_file(primary: Daemon) -> None:
    uri = primary.uri()
    path = primary.volume().path
    qemu_io(uri, f"write -P 0xab 0 {4 * MiB}")
    allocated_before = allocated_bytes(path)
    assert allocated_before >= 4 * MiB

    qemu_io(uri, f"discard {MiB} {2 * MiB}")

    qemu_io(
        uri, f"read -P 0xab 0 {MiB}", f"read -P 0 {MiB} {2 * MiB}", f"read -P 0xab {3 * MiB} {MiB}"
    )
    assert allocated_bytes(path) <= allocated_before - 2 * MiB, "TRIM did not punch a hole"


def test_qemu_io_keeps_volumes_of_one_daemon_apart(daemons: Daemons) -> None:
    primary = daemons.start_primary(volumes=[("vol0", 16 * MiB), ("vol1", 16 * MiB)])
    qemu_io(primary.uri("vol0"), f"write -P 0x0a 0 {MiB}")
    qemu_io(primary.uri("vol1"), f"write -P 0x1b 0 {MiB}")

    qemu_io(primary.uri("vol0"), f"read -P 0x0a 0 {MiB}")
    qemu_io(primary.uri("vol1"), f"read -P 0x1b 0 {MiB}")
    assert read_at(primary.volume("vol0").path, 0, MiB) == b"\x0a" * MiB
    assert read_at(primary.volume("vol1").path, 0, MiB) == b"\x1b" * MiB


def test_qemu_io_reads_secondary_volume_and_cannot_write_it(daemons: Daemons) -> None:
    def fill(volume: Volume) -> None:
        with open(volume.path, "wb") as file:
            file.truncate(volume.size)
            file.seek(MiB)
            file.write(b"\x3c" * MiB)

    secondary = daemons.start_secondary(fill=fill)

    qemu_io(secondary.uri(), f"read -P 0 0 {MiB}", f"read -P 0x3c {MiB} {MiB}", read_only=True)
    # qemu refuses to open a read-only export for writing (it sees NBD_FLAG_READ_ONLY).
    attempt = qemu_io(secondary.uri(), f"write -P 0xee {MiB} 4096", check=False)
    assert attempt.returncode != 0, f"write to a read-only export succeeded: {attempt}"
    assert read_at(secondary.volume().path, MiB, MiB) == b"\x3c" * MiB


def test_qemu_img_convert_random_sparse_image_then_compare(primary: Daemon, tmp_path: Path) -> None:
    size = primary.volume().size
    source = tmp_path / "source.img"
    extents = [(0, 256 * KiB), (3 * MiB, MiB), (9 * MiB + 4 * KiB, 300 * KiB), (20 * MiB, 2 * MiB)]
    extents += [(41 * MiB + 512, 64 * KiB), (size - MiB, MiB)]
    make_sparse_image(source, size, extents, seed=20240611)
    data_bytes = sum(length for _, length in extents)
    # Data already in what is a hole of the source must come out as zeroes.
    qemu_io(primary.uri(), f"write -P 0x55 {5 * MiB} {4 * MiB}")

    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, primary.uri()])

    compare = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, primary.uri()])
    assert "Images are identical" in compare.stdout, compare
    assert filecmp.cmp(source, primary.volume().path, shallow=False), "volume file differs"
    allocated = allocated_bytes(primary.volume().path)
    assert allocated <= data_bytes + 4 * MiB, (
        f"volume file not sparse: {allocated} bytes allocated for {data_bytes} bytes of data"
    )
