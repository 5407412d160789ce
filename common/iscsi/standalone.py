"""A standalone iSCSI test target serving sparse files (not journalled, not replicated).

    python -m common.iscsi.standalone --listen 127.0.0.1:3260 \\
        --iqn iqn.2026-01.org.journalpair:test --lun FILE [--lun FILE ...] [--size BYTES]

LUN n is the n-th --lun; a missing file is created sparse at --size. Prints
"listening on HOST:PORT" on stderr once it accepts connections; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from common.iscsi import scsi
from common.iscsi.server import IscsiServer
from common.iscsi.textkeys import TargetLimits
from common.volume import Volume, VolumeError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m common.iscsi.standalone")
    parser.add_argument("--listen", default="127.0.0.1:3260", help="HOST:PORT")
    parser.add_argument("--iqn", required=True)
    parser.add_argument("--lun", action="append", required=True, type=Path, help="a volume file")
    parser.add_argument("--size", type=int, default=0, help="size of a file to create (bytes)")
    parser.add_argument("--prefer-crc32c", action="store_true", help="pick CRC32C digests")
    parser.add_argument("--verbose", action="store_true", help="log every UNMAP, WRITE SAME")
    return parser.parse_args(argv)


def open_volumes(paths: list[Path], size: int) -> dict[int, Volume]:
    volumes: dict[int, Volume] = {}
    for number, path in enumerate(paths):
        file_size = path.stat().st_size if path.exists() else size
        if file_size <= 0 or file_size % scsi.BLOCK_BYTES:
            raise VolumeError(f"{path}: size {file_size} is not a positive multiple of 512")
        volumes[number] = Volume.open_or_create(f"lun{number}", path, file_size)
    return volumes


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    volumes = open_volumes(args.lun, args.size)
    limits = TargetLimits(prefer_crc32c=args.prefer_crc32c)
    target = IscsiServer(args.iqn, list(volumes.values()), limits=limits)
    bound = await target.start(host, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await stop.wait()
    await target.stop()
    for volume in volumes.values():
        volume.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except VolumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
