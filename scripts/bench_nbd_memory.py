"""primaryd's RSS growth under many NBD clients that hold memory (tests/e2e/nbdhogs.py).

    primaryd, one 64 MiB volume, nbd: {max_connections, stall_timeout_s: 60[, memory_limit]}
    --read-hogs clients: 127 KiB READs never read back; --write-hogs: half a 32 MiB WRITE
    prints the peak RSS growth and how long a bystander's small I/O took meanwhile

Usage: .venv/bin/python scripts/bench_nbd_memory.py [--read-hogs 32] [--write-hogs 16]
       [--memory-limit 64MiB]   (absent: the key is left out of the config)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.helpers import Daemons, MiB
from tests.e2e.nbdhogs import hog
from tests.e2e.nbdsetup import rss_bytes, start_with_nbd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read-hogs", type=int, default=32)
    parser.add_argument("--write-hogs", type=int, default=16)
    parser.add_argument("--memory-limit", default=None)
    args = parser.parse_args()
    nbd = {"max_connections": 128, "stall_timeout_s": 60, "handshake_timeout_s": 30}
    if args.memory_limit is not None:
        nbd["memory_limit"] = args.memory_limit
    with tempfile.TemporaryDirectory(prefix="bench-nbd-memory-") as tmp:
        daemons = Daemons(Path(tmp))
        try:
            daemon = start_with_nbd(daemons, nbd=nbd)
            report = hog(daemon, args.read_hogs, args.write_hogs, rss_bytes(daemon.pid))
            print(
                f"memory_limit {args.memory_limit or '(key absent)'}: {args.read_hogs} read hogs"
                f" + {args.write_hogs} write hogs; RSS {report.rss_before / MiB:.0f} MiB before,"
                f" peak {report.rss_peak / MiB:.0f} MiB, grown {report.grown / MiB:.0f} MiB;"
                f" bystander I/O {report.bystander_s:.2f} s"
            )
        finally:
            daemons.stop_all()


if __name__ == "__main__":
    main()
