"""NBD throughput over TLS vs plaintext: nbdcopy to and from one primaryd (nbd.tls optional).

    openssl: a CA, the server's certificate (127.0.0.1), a client directory for libnbd
    primaryd, one volume of --size, nbd.tls {mode: optional, ca}: both clients on one server
    for rep in 1..--reps, interleaved plain / TLS:
        nbdcopy SOURCE nbd[s]://...   (write: random content, fresh every rep)
        nbdcopy nbd[s]://... null:    (read)
    median MiB/s [min-max] of each, and the ratio TLS / plaintext

Usage: .venv/bin/python scripts/bench_nbd_tls.py [--size-mib 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Path:
    """ca.crt, server.crt/key in d; d/client holds what libnbd's tls-certificates wants."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
            "-days", "1", "-subj", "/CN=ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    client = d / "client"
    client.mkdir()
    for name, key, usage in (("server", d / "server.key", "serverAuth"),
                             ("client", client / "client-key.pem", "clientAuth")):  # fmt: skip
        ext = d / f"{name}.ext"
        ext.write_text(f"extendedKeyUsage={usage}\nsubjectAltName=IP:{HOST}\n")
        openssl("req", *ec, "-keyout", str(key), "-out", str(d / f"{name}.csr"),
                "-subj", f"/CN={name}")  # fmt: skip
        cert = d / "server.crt" if name == "server" else client / "client-cert.pem"
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(cert),
                "-days", "1", "-extfile", str(ext))  # fmt: skip
    (client / "ca-cert.pem").write_bytes((d / "ca.crt").read_bytes())
    return client


def timed_mib_s(argv: list[str], mib: int) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, timeout=600)
    return mib / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nbd-tls-") as tmp:
        d = Path(tmp)
        client = make_pki(d)
        port = 20000 + os.getpid() % 20000
        (d / "p.yaml").write_text(
            f"role: primary\ngroup: jg0\ndata_dir: {d}/data\n"
            f"listen: {{nbd: '{HOST}:{port}', replication: '{HOST}:{port + 1}'}}\n"
            f"control: {d}/p.sock\njournal: {{capacity: 64MiB}}\n"
            f"volumes: [{{name: vol0, path: {d}/vol0.img, size: {args.size_mib}MiB}}]\n"
            f"nbd: {{tls: {{cert: {d}/server.crt, key: {d}/server.key, ca: {d}/ca.crt, "
            "mode: optional}}\n"
        )
        log = (d / "p.log").open("wb")
        daemon = subprocess.Popen([VENV_BIN / "primaryd", "--config", d / "p.yaml"], stderr=log)
        try:
            time.sleep(2)
            uris = {
                "plain": f"nbd://{HOST}:{port}/vol0",
                "tls": f"nbds://{HOST}:{port}/vol0?tls-certificates={client}",
            }
            results: dict[str, list[float]] = {}
            source = d / "source.img"
            for _ in range(args.reps):
                for kind, uri in uris.items():
                    source.write_bytes(os.urandom(args.size_mib << 20))
                    w = timed_mib_s(["nbdcopy", str(source), uri], args.size_mib)
                    r = timed_mib_s(["nbdcopy", uri, "null:"], args.size_mib)
                    results.setdefault(f"{kind} write", []).append(w)
                    results.setdefault(f"{kind} read", []).append(r)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:12} {median:7.0f} MiB/s [{min(values):.0f}-{max(values):.0f}]")
    for op in ("write", "read"):
        ratio = statistics.median(results[f"tls {op}"]) / statistics.median(results[f"plain {op}"])
        print(f"TLS / plaintext {op}: {ratio:.2f}")


if __name__ == "__main__":
    main()
