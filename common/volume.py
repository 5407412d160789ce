"""A volume is a sparse regular file of a fixed size.

All I/O here is plain page-cache syscalls, cheap enough to run inline on the
event loop; only `sync()` (fdatasync) can take long and is meant to be called
from an executor (see `common.syncer`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

# Zero buffers written when the file system cannot punch or zero a range.
_ZERO_CHUNK = bytes(1 << 20)


class VolumeError(Exception):
    """A volume file that cannot be opened or used as configured."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the volume that is either all data or all hole."""

    offset: int
    length: int
    hole: bool


class Volume:
    """A fixed-size sparse file opened read-write (or read-only)."""

    def __init__(self, name: str, path: Path, size: int, *, read_only: bool = False) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.read_only = read_only
        self._fd = -1
        self.can_punch = True
        self.can_zero_range = True

    @classmethod
    def open_or_create(cls, name: str, path: Path, size: int, *, read_only: bool = False) -> Volume:
        """Open `path`, creating it sparse at `size` if missing; never resize."""
        volume = cls(name, path, size, read_only=read_only)
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                path.unlink()
                raise
        except FileExistsError:
            fd = os.open(path, flags)
        except OSError as exc:
            raise VolumeError(f"create volume {name} at {path}: {exc.strerror}") from exc
        actual = os.fstat(fd).st_size
        if actual != size:
            os.close(fd)
            raise VolumeError(
                f"volume {name}: {path} has size {actual}, config says {size}; refusing to resize"
            )
        volume._fd = fd
        return volume

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- reads -------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # cannot happen inside the file size; be exact anyway
            data += bytes(length - len(data))
        return data

    def extents(self, offset: int, length: int, max_extents: int = 1024) -> list[Extent]:
        """Data/hole runs covering [offset, offset+length), at most `max_extents`.

        The last extent may end before offset+length when the limit is hit.
        """
        end = offset + length
        result: list[Extent] = []
        pos = offset
        while pos < end and len(result) < max_extents:
            data_start = self._seek(pos, os.SEEK_DATA)
            if data_start > pos:
                hole_end = min(data_start, end)
                result.append(Extent(pos, hole_end - pos, True))
                pos = hole_end
                continue
            data_end = min(self._seek(pos, os.SEEK_HOLE), end)
            result.append(Extent(pos, data_end - pos, False))
            pos = data_end
        return result

    def _seek(self, offset: int, whence: int) -> int:
        try:
            return os.lseek(self._fd, offset, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset: hole to the end
                return self.size
            raise

    # -- writes ------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        written = os.pwrite(self._fd, data, offset)
        if written == len(data):
            return
        view = memoryview(data)[written:]
        offset += written
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeroes."""
        if self.can_punch:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.can_punch = False
        self._write_zero_bytes(offset, length)

    def zero(self, offset: int, length: int, *, allocate: bool) -> None:
        """Make a range read as zeroes, keeping it allocated if `allocate`."""
        if not allocate:
            self.punch(offset, length)
            return
        if self.can_zero_range:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.can_zero_range = False
        self._write_zero_bytes(offset, length)

    def zero_is_fast(self, *, allocate: bool) -> bool:
        return self.can_zero_range if allocate else self.can_punch

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.write(offset, memoryview(_ZERO_CHUNK)[:n])
            offset += n

    def advise_willneed(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def sync(self) -> None:
        """Make every completed write durable (blocking: call from an executor)."""
        os.fdatasync(self._fd)


def is_zeros(data: bytes) -> bool:
    """Whether `data` is all zero bytes: a memcmp against a fresh zero buffer (calloc gives
    zero pages for free), about 10x faster than counting the zeros."""
    return data == bytes(len(data))
