"""ext4 on the P-VOL, written before, during and after the initial copy, is intact on the S-VOL.

primaryd ◄── nbdfuse ── loop ── ext4 (mounted)        secondaryd pulls, destages to its S-VOL
   before create: a few files of random bytes, fsynced
   pairctl create ─► COPY   while a writer thread keeps creating + fsyncing files
   PAIR ─► more files ─► sync ─► umount ─► losetup -d ─► fusermount3 -u ─► lag 0
S-VOL file == P-VOL file; cp --sparse=always ─► e2fsck -fn (clean)
   ─► losetup -r ─► mount -o ro ─► every file has the sha256 it was written with
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    KiB,
    MiB,
    display,
    pairctl,
    run,
    sha256_file,
    wait_caught_up,
    wait_state,
    wait_until,
)
from tests.e2e.test_nbd_filesystem import fuse_and_loop_unavailable, loop_device, mounted, nbdfuse

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(240)]

VOLUME_SIZE = 256 * MiB


def write_file(path: Path, data: bytes) -> str:
    """Create ``path`` with ``data``, fsync it (and its directory); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def write_files(root: Path, prefix: str, count: int, size: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {
        name: write_file(root / name, rng.randbytes(size))
        for name in (f"{prefix}/file-{i}.bin" for i in range(count))
    }


class FileWriter(threading.Thread):
    """Creates and fsyncs files (64..512 KiB of random bytes) until stopped; remembers each
    file's sha256 and the wall-clock time its fsync returned."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.rng = random.Random(777)
        self.stop = threading.Event()
        self.written: dict[str, str] = {}
        self.synced_at: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                name = f"during/{n // 100:03d}/file-{n}.bin"
                size = self.rng.randrange(64, 513) * KiB
                self.written[name] = write_file(self.root / name, self.rng.randbytes(size))
                self.synced_at.append(time.time())
                n += 1
        except BaseException as exc:
            self.error = exc


def transition_time(daemon: Daemon, new: str) -> float:
    """When (epoch seconds) the daemon's event log says it entered state ``new``, the last time."""
    events = [json.loads(line) for line in pairctl(daemon, "events").stdout.splitlines() if line]
    times = [e["time"] for e in events if e["new"] == new]
    assert times, f"no transition to {new} in {events}"
    return datetime.fromisoformat(times[-1].replace("Z", "+00:00")).timestamp()


def test_ext4_written_during_and_after_the_copy_is_intact_on_the_s_vol(
    daemons: Daemons, tmp_path: Path
) -> None:
    reason = fuse_and_loop_unavailable()
    if reason:
        pytest.skip(reason)  # as test_nbd_filesystem.py does
    primary, secondary = daemons.start_pair((("vol0", VOLUME_SIZE),))
    fuse_dir, mnt = tmp_path / "fuse", tmp_path / "mnt"
    writer = FileWriter(mnt)

    with nbdfuse(primary.uri(), fuse_dir) as image, loop_device(image) as device:
        run(["mkfs.ext4", "-q", "-F", "-L", "jp-pair", device], timeout=120)
        with mounted(device, mnt):
            expected = write_files(mnt, "before", count=6, size=4 * MiB, seed=1)
            writer.start()
            try:
                wait_until(lambda: len(writer.synced_at) >= 3, 30, "the writer to get going")
                pairctl(primary, "create")
                copy_started = time.time()
                wait_until(lambda: display(primary)["state"] == "PAIR", 120, "PAIR", interval_s=0.1)
            finally:
                writer.stop.set()
                writer.join(timeout=60)
            assert not writer.is_alive(), "the writer thread hung"
            assert writer.error is None, f"the writer failed: {writer.error!r}"
            copy_done = transition_time(primary, "PAIR")
            during_copy = [t for t in writer.synced_at if copy_started < t < copy_done]
            assert during_copy, (
                f"no file was fsynced during COPY ({copy_done - copy_started:.2f} s); "
                f"{len(writer.synced_at)} files in all"
            )
            expected |= writer.written
            expected |= write_files(mnt, "after", count=3, size=2 * MiB, seed=2)
            run(["sync", "-f", mnt / "after"], timeout=60)

    wait_caught_up(primary, timeout_s=120)
    wait_state(secondary, "PAIR", 30)
    pvol, svol = primary.volume().path, secondary.volume().path
    assert sha256_file(svol) == sha256_file(pvol), "the S-VOL differs from the P-VOL"

    copy = tmp_path / "s-vol-copy.img"
    run(["cp", "--sparse=always", svol, copy], timeout=60)
    fsck = run(["e2fsck", "-fn", copy], check=False, timeout=120)
    assert fsck.returncode == 0, f"e2fsck -fn found problems:\n{fsck.stdout}\n{fsck.stderr}"

    ro_mnt = tmp_path / "s-vol"
    with loop_device(copy, read_only=True) as device, mounted(device, ro_mnt, read_only=True):
        found = {name: sha256_file(ro_mnt / name) for name in expected}
        on_disk = {
            str(path.relative_to(ro_mnt)) for path in ro_mnt.rglob("*.bin") if path.is_file()
        }
    assert on_disk == set(expected)
    assert found == expected
