"""The replication link over TLS vs plaintext: initial copy time and backlog drain.

    openssl: a CA and one certificate per site (link.tls {cert, key, ca} on both)
    for rep in 1..--reps, interleaved plain / TLS, each in a fresh directory:
        primaryd with one volume of --size-gib, 25% full (1 MiB of random data every 4 MiB)
        secondaryd ─► pairctl create ─► PAIR: the copy time
        secondaryd SIGSTOPped ─► fio writes --backlog-mib in 1 MiB blocks ─► SIGCONT
        ─► lag 0: the drain time
    median of each, and the throughput ratio TLS / plaintext (plaintext time / TLS time)

Usage: .venv/bin/python scripts/bench_link_tls.py [--size-gib 1] [--backlog-mib 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.helpers import Daemons, display, pairctl, wait_caught_up, wait_state, wait_until

GiB = 1 << 30
MiB = 1 << 20


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> dict[str, dict[str, str]]:
    """link.tls sections for site a and site b, signed by one CA."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
            "-subj", "/CN=ca")  # fmt: skip
    sites = {}
    for name in ("a", "b"):
        key, csr, crt = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
                "-CAcreateserial", "-out", str(crt), "-days", "2")  # fmt: skip
        sites[name] = {"cert": str(crt), "key": str(key), "ca": str(ca_crt)}
    return sites


def fill_quarter(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, 4 * MiB):
            f.seek(offset)
            f.write(os.urandom(MiB))


def big_journal(config: Path, size: int) -> None:
    text = config.read_text()
    config.write_text(text.replace("capacity: 64MiB", f"capacity: {2 * size}"))


def one_run(
    tls: bool, base: Path, certs: dict[str, dict[str, str]], args: argparse.Namespace
) -> tuple[float, float]:
    """(copy seconds, drain seconds) on fresh daemons."""
    size = args.size_gib * GiB
    daemons = Daemons(Path(tempfile.mkdtemp(dir=base)))
    link: dict[str, Any] | None = {"tls": certs["a"]} if tls else None
    primary = daemons.prepare("primary", volumes=(("vol0", size),), link=link)
    fill_quarter(primary.volume().path, size)
    big_journal(primary.config_path, size)
    primary.start()
    link = {"tls": certs["b"]} if tls else None
    secondary = daemons.prepare(
        "secondary", volumes=(("vol0", size),), primary_port=primary.peer_port, link=link
    )
    big_journal(secondary.config_path, size)
    secondary.start()
    try:
        wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
        started = time.monotonic()
        pairctl(primary, "create")
        wait_state(primary, "PAIR", 300)
        copy_s = time.monotonic() - started
        os.kill(secondary.pid, signal.SIGSTOP)
        try:
            subprocess.run(
                ["fio", "--name=backlog", "--ioengine=nbd", f"--uri={primary.uri()}",
                 "--rw=write", "--bs=1m", "--iodepth=8", f"--size={args.backlog_mib}m",
                 "--output=/dev/null"],
                check=True, timeout=300,
            )  # fmt: skip
        finally:
            os.kill(secondary.pid, signal.SIGCONT)
        started = time.monotonic()
        wait_caught_up(primary, 300)
        drain_s = time.monotonic() - started
    finally:
        daemons.stop_all()
    return copy_s, drain_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=int, default=1)
    parser.add_argument("--backlog-mib", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-link-tls-") as tmp:
        base = Path(tmp)
        certs = make_certs(base)
        results: dict[str, list[tuple[float, float]]] = {"plaintext": [], "TLS": []}
        for rep in range(args.reps):
            for kind in results:
                results[kind].append(one_run(kind == "TLS", base, certs, args))
                copy_s, drain_s = results[kind][-1]
                print(f"rep {rep + 1} {kind:9} copy {copy_s:6.2f} s  drain {drain_s:6.2f} s")
    for i, measure in enumerate(("initial copy", f"{args.backlog_mib} MiB drain")):
        plain = statistics.median(r[i] for r in results["plaintext"])
        tls = statistics.median(r[i] for r in results["TLS"])
        print(
            f"{measure}: plaintext {plain:.2f} s, TLS {tls:.2f} s, "
            f"throughput ratio TLS/plaintext {plain / tls:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
