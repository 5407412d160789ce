"""A real filesystem on an export: nbdfuse file -> loop device -> ext4, then e2fsck a copy.

nbdfuse MNT/disk.img nbd://.../vol0 ── losetup ── mkfs.ext4 ── mount ── write files
    ── sync, umount, losetup -d, fusermount3 -u
nbdcopy export -> copy.img ── e2fsck -fn copy.img (clean)
nbdfuse -r ── losetup -r ── mount -o ro ── checksums match what was written
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemons, MiB, run, sha256_file, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(180)]


def fuse_and_loop_unavailable() -> str | None:
    """Why this machine cannot run the test, or None. Missing tools are a failure, not a skip."""
    if os.geteuid() != 0:
        return "needs root for losetup and mount"
    try:
        with open("/dev/fuse", "rb+", buffering=0):
            pass
    except OSError as exc:
        return f"/dev/fuse unavailable: {exc}"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop devices (/dev/loop-control missing)"
    probe = run(["losetup", "--find"], check=False, timeout=10)
    if probe.returncode != 0:
        return f"no free loop device: {probe.stderr.strip()}"
    return None


@contextlib.contextmanager
def nbdfuse(uri: str, mountpoint: Path, read_only: bool = False) -> Iterator[Path]:
    """nbdfuse in the background exposing ``uri`` as MOUNTPOINT/disk.img; unmounted after."""
    mountpoint.mkdir(exist_ok=True)
    image = mountpoint / "disk.img"
    log_path = mountpoint.with_name(f"{mountpoint.name}-nbdfuse.log")
    argv = ["nbdfuse", *(["-r"] if read_only else []), str(image), uri]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(
            lambda: proc.poll() is not None or (os.path.ismount(mountpoint) and image.exists()),
            timeout_s=15,
            what=f"nbdfuse to expose {image}",
        )
        if proc.poll() is not None:
            raise AssertionError(
                f"nbdfuse exited with {proc.returncode}: {log_path.read_text(errors='replace')}"
            )
        yield image
    finally:
        if os.path.ismount(mountpoint):
            run(["fusermount3", "-u", mountpoint], check=False, timeout=30)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def loop_device(image: Path, read_only: bool = False) -> Iterator[str]:
    flags = ["--read-only"] if read_only else []
    device = run(["losetup", "--find", "--show", *flags, image], timeout=30).stdout.strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device], check=False, timeout=30)


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path, read_only: bool = False) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    run(["mount", "-t", "ext4", *(["-o", "ro"] if read_only else []), device, mountpoint])
    try:
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            result = run(["umount", mountpoint], check=False, timeout=60)
            if result.returncode != 0:
                run(["umount", "-l", mountpoint], check=False, timeout=30)


def write_files(root: Path) -> dict[str, str]:
    """A few files (one of several MiB of random bytes); returns name -> sha256."""
    rng = random.Random(4242)
    contents = {
        "hello.txt": b"journalpair over NBD\n",
        "dir/sub/small.bin": rng.randbytes(12345),
        "dir/random-6m.bin": rng.randbytes(6 * MiB),
        "dir/zeros-1m.bin": bytes(MiB),
    }
    for name, data in contents.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def test_ext4_on_nbdfuse_loop_survives_umount_and_checks_clean(
    daemons: Daemons, tmp_path: Path
) -> None:
    reason = fuse_and_loop_unavailable()
    if reason:
        pytest.skip(reason)
    primary = daemons.start_primary(volumes=[("vol0", 128 * MiB)])
    fuse_dir, mnt = tmp_path / "fuse", tmp_path / "mnt"

    with nbdfuse(primary.uri(), fuse_dir) as image, loop_device(image) as device:
        run(["mkfs.ext4", "-q", "-F", "-L", "jp-e2e", device], timeout=120)
        with mounted(device, mnt):
            expected = write_files(mnt)
            run(["sync", "-f", mnt / "hello.txt"], timeout=60)

    copy = tmp_path / "copy.img"
    run(["nbdcopy", primary.uri(), copy], timeout=60)
    fsck = run(["e2fsck", "-fn", copy], check=False, timeout=60)
    assert fsck.returncode == 0, f"e2fsck -fn found problems:\n{fsck.stdout}\n{fsck.stderr}"
    assert sha256_file(copy) == sha256_file(primary.volume().path), "export != volume file"

    with (
        nbdfuse(primary.uri(), fuse_dir, read_only=True) as image,
        loop_device(image, read_only=True) as device,
        mounted(device, mnt, read_only=True),
    ):
        found = {name: sha256_file(mnt / name) for name in expected}
    assert found == expected
