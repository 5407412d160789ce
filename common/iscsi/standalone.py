"""A standalone iSCSI test target serving sparse files (not journalled, not replicated).

    python -m common.iscsi.standalone --listen 127.0.0.1:3260 \\
        --iqn iqn.2026-01.org.journalpair:test --lun FILE [--lun FILE ...] [--size BYTES]

LUN n is the n-th --lun; a missing file is created sparse at --size. --chap-user with
--chap-secret-file makes every login pass CHAP (secrets of 12 bytes or more). Prints
"listening on HOST:PORT" on stderr once it accepts connections; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from common.daemon import keep_big_buffers_in_the_heap
from common.iscsi import scsi
from common.iscsi.chap import ChapSecrets
from common.iscsi.server import IscsiServer
from common.iscsi.textkeys import TargetLimits
from common.volume import Volume, VolumeError


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: not in 0..3600 seconds")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m common.iscsi.standalone")
    parser.add_argument("--listen", default="127.0.0.1:3260", help="HOST:PORT")
    parser.add_argument("--iqn", required=True)
    parser.add_argument("--lun", action="append", required=True, type=Path, help="a volume file")
    parser.add_argument("--size", type=int, default=0, help="size of a file to create (bytes)")
    parser.add_argument("--prefer-crc32c", action="store_true", help="pick CRC32C digests")
    parser.add_argument(
        "--max-recv-data-segment-length", type=int, default=256 << 10, help="bytes a PDU"
    )
    parser.add_argument("--nop-in-interval", type=seconds, default=5.0, help="ping after S idle")
    parser.add_argument("--nop-in-timeout", type=seconds, default=10.0, help="drop after S")
    parser.add_argument("--chap-user", help="require CHAP with this initiator user")
    parser.add_argument("--chap-secret-file", type=Path, help="the initiator's CHAP secret")
    parser.add_argument("--chap-mutual-user", help="the target's user for mutual CHAP")
    parser.add_argument("--chap-mutual-secret-file", type=Path, help="the target's secret")
    parser.add_argument("--verbose", action="store_true", help="log every UNMAP, WRITE SAME")
    return parser.parse_args(argv)


def chap_secrets(args: argparse.Namespace) -> ChapSecrets | None:
    """--chap-user and --chap-secret-file (one line, its trailing newline dropped)."""
    if (args.chap_user is None) != (args.chap_secret_file is None):
        raise ValueError("--chap-user and --chap-secret-file go together")
    if args.chap_user is None:
        return None

    def secret(path: Path | None) -> bytes | None:
        return path.read_bytes().rstrip(b"\r\n") if path is not None else None

    return ChapSecrets(
        args.chap_user,
        secret(args.chap_secret_file) or b"",
        args.chap_mutual_user,
        secret(args.chap_mutual_secret_file),
    )


def open_volumes(paths: list[Path], size: int) -> dict[int, Volume]:
    volumes: dict[int, Volume] = {}
    for number, path in enumerate(paths):
        file_size = path.stat().st_size if path.exists() else size
        if file_size <= 0 or file_size % scsi.BLOCK_BYTES:
            raise VolumeError(f"{path}: size {file_size} is not a positive multiple of 512")
        volumes[number] = Volume.open_or_create(f"lun{number}", path, file_size)
    return volumes


async def serve(args: argparse.Namespace, chap: ChapSecrets | None) -> None:
    host, _, port = args.listen.rpartition(":")
    volumes = open_volumes(args.lun, args.size)
    limits = TargetLimits(
        prefer_crc32c=args.prefer_crc32c,
        max_recv_data_segment_bytes=args.max_recv_data_segment_length,
    )
    target = IscsiServer(
        args.iqn,
        list(volumes.values()),
        limits=limits,
        chap=chap,
        nop_in_interval_s=args.nop_in_interval,
        nop_in_timeout_s=args.nop_in_timeout,
    )
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
        chap = chap_secrets(args)
    except (ValueError, OSError) as exc:
        print(f"error: CHAP: {exc}", file=sys.stderr)
        return 2
    keep_big_buffers_in_the_heap()  # as the daemons do: 1 MiB READs without page faults
    try:
        uvloop.run(serve(args, chap))  # the daemons' loop: what we measure is theirs
    except VolumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
