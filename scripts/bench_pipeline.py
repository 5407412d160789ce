"""The replication pipeline, measured: initial copy vs nbdcopy, and lag under a write burst.

    content: a volume 25% full of random data (random 1 MiB chunks), made once
    copy   (per rep, interleaved):  journalpair: fresh primary + secondary, create ─► PAIR,
                                                 then split, write 1% in 64 KiB regions,
                                                 resync ─► PAIR (time, bytes copied)
                                    nbdcopy:     the same image ─► qemu-nbd (fresh target)
    burst  (per rep): paired empty volume; fio 4k randwrite QD32 for --burst-s seconds,
                      display polled every 0.25 s (peak lag); at fio's end: lag entries and
                      seconds; then time until lag.entries == 0
Prints medians [min-max] and writes the raw numbers to bench-results/pipeline-*.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
RESULTS = ROOT / "bench-results"
MiB = 1 << 20
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_content(path: Path, size: int, fill: float, seed: int = 1) -> int:
    rng = random.Random(seed)
    chunks = size // MiB
    chosen = rng.sample(range(chunks), int(chunks * fill))
    with path.open("wb") as f:
        f.truncate(size)
        for chunk in sorted(chosen):
            f.seek(chunk * MiB)
            f.write(rng.randbytes(MiB))
    return len(chosen) * MiB


class Pair:
    """primaryd + secondaryd in a directory, with free ports."""

    def __init__(self, work: Path, size: int, journal: str, primary_image: Path | None) -> None:
        self.work = work
        self.repl_port, self.p_nbd, self.s_nbd = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.p_cfg = self._config("primary", size, journal, primary_image)
        self.s_cfg = self._config("secondary", size, journal, None)

    def _config(self, role: str, size: int, journal: str, image: Path | None) -> Path:
        site = self.work / role
        site.mkdir()
        volume = site / "vol0.img"
        if image is not None:  # keep it sparse: holes are what the copy skips
            subprocess.run(["cp", "--sparse=always", image, volume], check=True)
        config: dict[str, Any] = {"role": role, "group": "bench", "data_dir": str(site / "data")}
        if role == "primary":
            config["listen"] = {
                "nbd": f"127.0.0.1:{self.p_nbd}",
                "replication": f"127.0.0.1:{self.repl_port}",
            }
        else:
            config["listen"] = {"nbd": f"127.0.0.1:{self.s_nbd}"}
            config["primary"] = f"127.0.0.1:{self.repl_port}"
        config["control"] = str(site / "ctl.sock")
        config["journal"] = {"capacity": journal}
        config["volumes"] = [{"name": "vol0", "path": str(volume), "size": size}]
        path = site / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> None:
        for role, cfg in (("primary", self.p_cfg), ("secondary", self.s_cfg)):
            log = (cfg.parent / f"{role}.log").open("wb")
            self.procs.append(
                subprocess.Popen([BIN / f"{role}d", "--config", cfg], stdout=log, stderr=log)
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.display(self.p_cfg).get("link", {}).get("up"):
            if time.monotonic() > deadline:
                raise RuntimeError("the pair did not connect")
            time.sleep(0.05)

    def display(self, cfg: Path) -> dict[str, Any]:
        out = subprocess.run(
            [BIN / "pairctl", "--config", cfg, "display", "--json"], capture_output=True, text=True
        )
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def create_and_wait(self) -> float:
        """Seconds from SMPL -> COPY to COPY -> PAIR, by the daemon's event times (pairctl's
        own start-up, ~0.3 s per call here, is not the copy's)."""
        subprocess.run([BIN / "pairctl", "--config", self.p_cfg, "create"], check=True)
        subprocess.run(
            [BIN / "pairctl", "--config", self.p_cfg, "wait", "PAIR", "--timeout", "600"],
            check=True,
        )
        return self.last_copy_s()

    def pairctl(self, *args: str) -> str:
        return subprocess.run(
            [BIN / "pairctl", "--config", self.p_cfg, *args],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    def resync_after_changing(self, fraction: float, size: int) -> dict[str, float]:
        """split, write `fraction` of the volume in random 64 KiB regions, resync to PAIR."""
        self.pairctl("split")
        rng = random.Random(9)
        regions = rng.sample(range(size // (64 << 10)), int(size * fraction) // (64 << 10))
        commands: list[str] = []
        for region in regions:
            commands += ["-c", f"write -P 0x5c {region * (64 << 10)} 64k"]
        subprocess.run(
            ["qemu-io", "-f", "raw", *commands, f"nbd://127.0.0.1:{self.p_nbd}/vol0"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.pairctl("resync")
        self.pairctl("wait", "PAIR", "--timeout", "600")
        events = [json.loads(e) for e in self.pairctl("events").splitlines()]
        done = [e for e in events if e["old"] == "COPY" and e["new"] == "PAIR"][-1]
        return {"seconds": self.last_copy_s(), "bytes": int(done["copied_bytes"])}

    def last_copy_s(self) -> float:
        """From the daemon's own events: the last -> COPY to the next COPY -> PAIR."""
        events = [json.loads(e) for e in self.pairctl("events").splitlines()]
        began = [e["time"] for e in events if e["new"] == "COPY"][-1]
        ended = [e["time"] for e in events if e["old"] == "COPY" and e["new"] == "PAIR"][-1]
        return _epoch(ended) - _epoch(began)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=30)


def _epoch(iso: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def nbdcopy_time(image: Path, work: Path, size: int) -> float:
    target = work / "target.img"
    with target.open("wb") as f:
        f.truncate(size)
    port = free_port()
    server = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-t", "-x", "vol0", "-p", str(port), "-b", "127.0.0.1",
         "--cache=writeback", str(target)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        uri = f"nbd://127.0.0.1:{port}/vol0"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.05)
        start = time.monotonic()
        subprocess.run(["nbdcopy", str(image), uri], check=True)
        return time.monotonic() - start
    finally:
        server.terminate()
        server.wait(timeout=30)


def burst(work: Path, size: int, burst_s: int) -> dict[str, float]:
    pair = Pair(work, size, "1GiB", None)
    pair.start()
    try:
        pair.create_and_wait()
        peak = {"entries": 0, "bytes": 0, "seconds": 0.0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                lag = pair.display(pair.p_cfg).get("lag", {})
                for key in peak:
                    peak[key] = max(peak[key], lag.get(key, 0))
                stop.wait(0.25)

        sampler = threading.Thread(target=sample)
        sampler.start()
        subprocess.run(
            ["fio", "--name=burst", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{pair.p_nbd}/vol0",
             "--rw=randwrite", "--bs=4k", "--iodepth=32", "--time_based",
             f"--runtime={burst_s}", "--output-format=json", f"--output={work / 'fio.json'}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        end_lag = pair.display(pair.p_cfg)["lag"]
        ended = time.monotonic()
        while pair.display(pair.p_cfg)["lag"]["entries"] > 0:
            time.sleep(0.05)
        drain_s = time.monotonic() - ended
        stop.set()
        sampler.join()
        iops = json.loads((work / "fio.json").read_text())["jobs"][0]["write"]["iops"]
        return {
            "iops": iops,
            "end_lag_entries": end_lag["entries"],
            "end_lag_seconds": end_lag["seconds"],
            "peak_lag_entries": peak["entries"],
            "peak_lag_bytes": peak["bytes"],
            "peak_lag_seconds": peak["seconds"],
            "drain_s": drain_s,
        }
    finally:
        pair.stop()


def fmt(xs: list[float], unit: str = "") -> str:
    return f"{statistics.median(xs):.2f}{unit} [{min(xs):.2f}-{max(xs):.2f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=1 << 30)
    p.add_argument("--fill", type=float, default=0.25)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--burst-s", type=int, default=20)
    opts = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pipeline-", dir=RESULTS))
    results: dict[str, Any] = {
        "settings": vars(opts), "copy": [], "nbdcopy": [], "resync": [], "burst": []
    }  # fmt: skip
    try:
        image = work / "content.img"
        data = make_content(image, opts.size, opts.fill)
        print(f"content: {opts.size} bytes, {data} bytes of data", file=sys.stderr)
        for rep in range(opts.reps):
            rep_dir = work / f"rep{rep}"
            rep_dir.mkdir()
            pair = Pair(rep_dir, opts.size, "1GiB", image)
            pair.start()
            try:
                results["copy"].append(pair.create_and_wait())
                results["resync"].append(pair.resync_after_changing(0.01, opts.size))
            finally:
                pair.stop()
            results["nbdcopy"].append(nbdcopy_time(image, rep_dir, opts.size))
            print(f"rep {rep}: copy {results['copy'][-1]:.2f} s, nbdcopy "
                  f"{results['nbdcopy'][-1]:.2f} s", file=sys.stderr)  # fmt: skip
            shutil.rmtree(rep_dir)
        for rep in range(opts.reps):
            rep_dir = work / f"burst{rep}"
            rep_dir.mkdir()
            results["burst"].append(burst(rep_dir, opts.size, opts.burst_s))
            print(f"burst {rep}: {results['burst'][-1]}", file=sys.stderr)
            shutil.rmtree(rep_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = RESULTS / time.strftime("pipeline-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    copy, ref = results["copy"], results["nbdcopy"]
    print(f"initial copy to PAIR ({opts.fill:.0%} full): {fmt(copy, ' s')}")
    print(f"nbdcopy to qemu-nbd (same image):          {fmt(ref, ' s')}")
    print(f"ratio journalpair/nbdcopy (time, lower is better): "
          f"{statistics.median(copy) / statistics.median(ref):.2f}")  # fmt: skip
    resync_s = [r["seconds"] for r in results["resync"]]
    resync_bytes = [r["bytes"] for r in results["resync"]]
    print(f"resync after changing 1%:  {fmt(resync_s, ' s')}, {fmt(resync_bytes)} bytes")
    print(f"resync / full initial copy (time): "
          f"{statistics.median(resync_s) / statistics.median(copy):.3f}")  # fmt: skip
    for key in results["burst"][0]:
        print(f"burst {key:<18} {fmt([b[key] for b in results['burst']])}")
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
