"""ext4 on the S-VOL is clean after a takeover, and holds every file fsynced before it died.

primaryd ◄── nbdfuse ── loop ── ext4 (mounted)             secondaryd pulls, destages (PAIR)
   writer process: before/ files (4..64 KiB, bytes derived from the name), fsync file + dir
   ─► marker.bin fsynced ─► pause ─► lag 0 (the S-VOL holds the marker) ─► go: after/ files
   SIGKILL primaryd mid-workload ─► the writer gets EIO
   ─► umount -l ─► losetup -d ─► fusermount3 -u -z (every step bounded, in finally blocks)
secondary: link down ─► pairctl takeover: exit 2, SSWS
   nbdfuse (rw) ── loop ── needs_recovery set ── mount (journal replay) ── umount
   ── e2fsck -fn clean ── mount -o ro ── every before/ file and the marker exact;
   after/ files are after/0..k, all whole but the last, which holds a prefix of its bytes
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    KiB,
    MiB,
    create_pair,
    display,
    format_result,
    pairctl,
    run,
    wait_caught_up,
    wait_until,
)
from tests.e2e.test_nbd_filesystem import fuse_and_loop_unavailable, mounted

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(240)]

VOLUME_SIZE = 128 * MiB
BEFORE_FILES = 200
BEFORE_DIRS = 4  # before/00 .. before/03, 50 files each
AFTER_FILES_AT_KILL = 25  # SIGKILL once the writer fsynced this many files after the marker
AFTER_FILES_MAX = 2000  # the writer's bound; it never gets there (the primary dies first)
FILE_BYTES_MIN, FILE_BYTES_MAX = 4 * KiB, 64 * KiB
MARKER = "marker.bin"
TEARDOWN_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parents[2]
_AFTER_NAME = re.compile(r"after/file-(\d{5})\.bin")


# --- the workload (runs in a child process) ----------------------------------------------------


def file_content(name: str) -> bytes:
    """A file's bytes, length (4..64 KiB, not block-aligned) and content derived from its name."""
    seed = hashlib.sha256(name.encode()).digest()
    span = FILE_BYTES_MAX - FILE_BYTES_MIN + 1
    size = FILE_BYTES_MIN + int.from_bytes(seed[:4], "little") % span
    return hashlib.shake_256(name.encode()).digest(size)


def before_name(i: int) -> str:
    return f"before/{i * BEFORE_DIRS // BEFORE_FILES:02d}/file-{i:04d}.bin"


def after_name(i: int) -> str:
    return f"after/file-{i:05d}.bin"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(root: Path, name: str) -> None:
    """Create ``name`` with its content, fsync it and its directory."""
    path = root / name
    with open(path, "wb") as file:
        file.write(file_content(name))
        file.flush()
        os.fsync(file.fileno())
    fsync_dir(path.parent)


def writer_main(root_arg: str) -> None:
    """The file workload, as a child process so that I/O stuck on the dead export can never
    hang pytest: one stdout line per fsynced file, "marker", then it waits for "go" on stdin."""
    root = Path(root_arg)

    def report(line: str) -> None:
        print(line, flush=True)

    try:
        dirs = ["before", *(f"before/{d:02d}" for d in range(BEFORE_DIRS)), "after"]
        for name in dirs:  # parents first; each new entry made durable in its parent
            (root / name).mkdir()
            fsync_dir((root / name).parent)
        for i in range(BEFORE_FILES):
            write_synced(root, before_name(i))
            report(f"synced {before_name(i)}")
        write_synced(root, MARKER)
        report("marker")
        if sys.stdin.readline().strip() != "go":
            return
        for i in range(AFTER_FILES_MAX):
            write_synced(root, after_name(i))
            report(f"synced {after_name(i)}")
        report("done")
    except OSError as exc:
        report(f"error {exc!r}")
        sys.exit(1)


class Workload:
    """The writer child process and what it reported (a reader thread collects its lines)."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.lines: list[str] = []
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"import sys; from {__name__} import writer_main; writer_main(sys.argv[1])",
                    os.fspath(root),
                ],
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.stdout:
            self.lines.append(line.rstrip("\n"))

    def synced(self, prefix: str) -> list[str]:
        return [
            line.split(" ", 1)[1]
            for line in list(self.lines)
            if line.startswith(f"synced {prefix}")
        ]

    @property
    def marker_synced(self) -> bool:
        return "marker" in self.lines

    @property
    def error(self) -> str | None:
        return next((line for line in list(self.lines) if line.startswith("error ")), None)

    @property
    def ended(self) -> bool:
        return self.proc.poll() is not None and not self.reader.is_alive()

    def go(self) -> None:
        self.stdin.write("go\n")
        self.stdin.flush()

    def describe(self) -> str:
        stderr = self.log_path.read_text(errors="replace")[-4000:]
        return (
            f"writer exit code {self.proc.poll()}, last lines {self.lines[-3:]}\n"
            f"--- writer stderr ---\n{stderr}"
        )

    def stop(self) -> None:
        """Kill the writer if it still runs (bounded: one stuck in the kernel is left behind)."""
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.stdin.close()
        self.reader.join(timeout=5)
        if not self.reader.is_alive():
            self.stdout.close()


# --- the primary's filesystem, torn down after its export died ---------------------------------


def run_bounded(argv: list[str | os.PathLike[str]], timeout_s: float = TEARDOWN_TIMEOUT_S) -> None:
    """A teardown command on a dead export: unlike subprocess.run, never waits unbounded for a
    child it killed (one stuck in uninterruptible I/O would hang the test run)."""
    args = [os.fspath(a) for a in argv]
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        raise AssertionError(f"teardown command hung ({timeout_s} s): {' '.join(args)}") from None
    if proc.returncode != 0:
        raise AssertionError(
            "teardown command failed\n" + format_result(args, proc.returncode, out, err)
        )


def mounted_at(mountpoint: Path) -> bool:
    """Whether anything is mounted there, from /proc/self/mounts: os.path.ismount() says no
    for a FUSE mount whose nbdfuse died (stat fails with ENOTCONN), which would leak it."""
    target = os.fspath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def stop_nbdfuse(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """fusermount3 -u -z (lazy: the loop device may still hold the file), then reap nbdfuse."""
    try:
        if mounted_at(mountpoint):
            run_bounded(["fusermount3", "-u", "-z", mountpoint])
    finally:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def wait_loop_released(devices: list[str]) -> None:
    """Nothing left behind: the kernel drops a loop device detached while busy only once its
    last user (a lazily unmounted ext4) lets go of it."""
    for device in devices:
        sysfs = Path("/sys/block", Path(device).name, "loop")
        wait_until(lambda p=sysfs: not p.exists(), 30, f"{device} to be released")  # type: ignore[misc]


@contextlib.contextmanager
def export_on_loop_device(uri: str, fuse_dir: Path) -> Iterator[str]:
    """nbdfuse exposes ``uri`` read-write as FUSE_DIR/disk.img, losetup puts a loop device on
    it. The teardown also copes with a dead export: every step bounded, each one run even when
    an earlier one failed."""
    with contextlib.ExitStack() as teardown:  # callbacks run in reverse order
        devices: list[str] = []
        teardown.callback(wait_loop_released, devices)
        fuse_dir.mkdir(exist_ok=True)
        image = fuse_dir / "disk.img"
        log_path = fuse_dir.with_name(f"{fuse_dir.name}-nbdfuse.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ["nbdfuse", os.fspath(image), uri], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        teardown.callback(stop_nbdfuse, proc, fuse_dir)
        wait_until(lambda: proc.poll() is not None or image.exists(), 15, f"nbdfuse on {uri}")
        assert proc.poll() is None, f"nbdfuse exited: {log_path.read_text(errors='replace')}"
        devices.append(run(["losetup", "--find", "--show", image], timeout=30).stdout.strip())
        teardown.callback(run_bounded, ["losetup", "-d", devices[0]])
        yield devices[0]


def lazy_umount(mountpoint: Path) -> None:
    if mounted_at(mountpoint):
        run_bounded(["umount", "-l", mountpoint])


def write_until_primary_killed(primary: Daemon, tmp_path: Path) -> Workload:
    """ext4 on the primary's export; the workload; SIGKILL of primaryd mid-workload."""
    mnt = tmp_path / "p-mnt"
    with (
        export_on_loop_device(primary.uri(), tmp_path / "p-fuse") as device,
        contextlib.ExitStack() as teardown,
    ):
        # Inode tables and journal zeroed now: no lazyinit thread writing in the background.
        mkfs = ["mkfs.ext4", "-q", "-F", "-L", "jp-takeover"]
        run([*mkfs, "-E", "lazy_itable_init=0,lazy_journal_init=0", device], timeout=120)
        mnt.mkdir()
        run(["mount", "-t", "ext4", device, mnt], timeout=60)
        teardown.callback(lazy_umount, mnt)

        workload = Workload(mnt, tmp_path / "writer.log")
        teardown.callback(workload.stop)
        wait_until(lambda: workload.marker_synced or workload.ended, 120, "the marker's fsync")
        assert workload.marker_synced, workload.describe()
        wait_caught_up(primary, timeout_s=60)  # the S-VOL holds everything up to the marker
        workload.go()
        wait_until(
            lambda: len(workload.synced("after/")) >= AFTER_FILES_AT_KILL or workload.ended,
            60,
            f"{AFTER_FILES_AT_KILL} files fsynced after the marker",
        )
        assert not workload.ended, workload.describe()
        primary.kill()
        wait_until(lambda: workload.ended, 30, "the writer to fail on the dead export")
        assert workload.error is not None, workload.describe()  # it died mid-workload
    return workload


# --- the S-VOL after the takeover ---------------------------------------------------------------


@dataclass
class Found:
    before_verified: int
    after_synced: int  # fsync returned on the primary before it died
    after_found: int
    after_whole: int


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and "lost+found" not in path.parts
    }


def check_files(files: dict[str, bytes], workload: Workload) -> Found:
    """Everything fsynced before the marker exact; after it, a prefix of the file sequence."""
    before = workload.synced("before/")
    assert before == [before_name(i) for i in range(BEFORE_FILES)], workload.describe()
    bad = {
        name: "missing" if name not in files else f"{len(files[name])} bytes, not its content"
        for name in [*before, MARKER]
        if files.get(name) != file_content(name)
    }
    assert not bad, f"files fsynced before the marker are wrong on the S-VOL: {bad}"

    after = sorted(name for name in files if name.startswith("after/"))
    assert all(_AFTER_NAME.fullmatch(name) for name in after), f"foreign files: {after}"
    unexpected = set(files) - set(before) - {MARKER} - set(after)
    assert not unexpected, f"files nobody wrote: {sorted(unexpected)}"
    synced = len(workload.synced("after/"))
    assert after == [after_name(i) for i in range(len(after))], (
        f"after/ files are not after/0..k (each was fsynced before the next was created): {after}"
    )
    assert len(after) <= synced + 1, f"{len(after)} after/ files, only {synced} fsynced + 1"
    torn = [n for n in after if not file_content(n).startswith(files[n])]
    assert not torn, f"after/ files that are not a prefix of their content: {torn}"
    whole = [n for n in after if files[n] == file_content(n)]
    assert whole == after[: len(whole)] and len(whole) >= len(after) - 1, (
        f"only the newest after/ file may be short: whole {whole} of {after}"
    )
    return Found(len(before), synced, len(after), len(whole))


def superblock_features(device: str) -> list[str]:
    header = run(["dumpe2fs", "-h", device], timeout=30).stdout
    line = next(ln for ln in header.splitlines() if ln.startswith("Filesystem features:"))
    return line.split(":", 1)[1].split()


def check_s_vol(secondary: Daemon, tmp_path: Path, workload: Workload) -> Found:
    mnt = tmp_path / "s-mnt"
    with export_on_loop_device(secondary.uri(), tmp_path / "s-fuse") as device:
        # The filesystem was mounted when the primary died: a crash image, its journal unreplayed.
        assert "needs_recovery" in superblock_features(device)
        with mounted(device, mnt):
            pass  # ext4 replays its journal on mount (writes: the S-VOL must be writable)
        assert "needs_recovery" not in superblock_features(device)
        fsck = run(["e2fsck", "-fn", device], check=False, timeout=120)
        assert fsck.returncode == 0, f"e2fsck -fn found problems:\n{fsck.stdout}\n{fsck.stderr}"
        with mounted(device, mnt, read_only=True):
            files = read_tree(mnt)
    return check_files(files, workload)


def test_ext4_on_the_s_vol_is_clean_after_a_takeover(
    daemons: Daemons, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = fuse_and_loop_unavailable()
    if reason:
        pytest.skip(reason)  # as test_nbd_filesystem.py does
    primary, secondary = daemons.start_pair((("vol0", VOLUME_SIZE),))
    create_pair(primary, secondary)
    workload = write_until_primary_killed(primary, tmp_path)

    wait_until(lambda: not display(secondary)["link"]["up"], 30, "the secondary to lose the link")
    proc = pairctl(secondary, "takeover", check=False)
    assert proc.returncode == 2, f"takeover exit {proc.returncode}: {proc.stderr}"  # 2: SSWS
    shown = display(secondary)
    assert shown["state"] == "SSWS", shown

    found = check_s_vol(secondary, tmp_path, workload)
    with capsys.disabled():
        print(
            f"\nS-VOL after takeover: {found.before_verified} files fsynced before the marker "
            f"verified; after the marker {found.after_synced} fsynced on the primary, "
            f"{found.after_found} found ({found.after_whole} whole, "
            f"{found.after_found - found.after_whole} a short prefix); "
            f"writer ended with {workload.error}"
        )
