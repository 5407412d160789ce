"""The replication pipeline against nbdcopy and the QEMU mirror: initial copy, resync, lag.

    content: a --size volume 25% full of random data (random 1 MiB chunks), and one empty
             (a sparse file, no data), made once; before each timed step, os.sync()
    copy   (per rep, interleaved, each to a fresh target):
      journalpair      fresh primary + secondary, create ─► PAIR (the S-VOL fdatasynced), by
                       the daemon's event times; then split, write 1% in 64 KiB regions,
                       resync ─► PAIR (time, bytes copied); the empty volume: create ─► PAIR
      nbdcopy          the image ─► qemu-nbd --cache=writeback: ends with data in page cache
      nbdcopy --flush  the same, then an NBD FLUSH, which qemu-nbd answers with fdatasync
      QEMU mirror      qemu-storage-daemon over the image, blockdev-mirror sync=full
                       copy-mode=background ─► qemu-nbd (servers.QemuMirror, as make bench):
                       job running ─► BLOCK_JOB_READY, by QEMU's event times (the mirror
                       flushes its target before it is ready); the empty volume too
    burst  (per rep): fio 4k randwrite QD32 for --burst-s seconds on an empty --burst-size volume
      journalpair      paired; display polled every 0.25 s (peak lag); at fio's end: lag
                       entries and seconds; then time until lag.entries == 0
      QEMU mirror      job ready; fio on qemu-storage-daemon's export; at fio's end the bytes
                       the job has left (len - offset); then time until offset == len
Prints medians [min-max] and per-rep ratios; raw numbers go to bench-results/pipeline-*.json.

Sizes: the copies use 2 GiB, as the issue says; the burst 512 MiB, so that make bench (this at
--reps 3 --burst-s 20) stays near 13 minutes on 2 cores. The mirror's convergence is what costs:
on an empty (sparse) volume its job, with 64 KiB granularity, has about the whole volume left
at fio's end, and copies chunks that are part data part hole slowly (here 2 GiB: 2.1 GB left,
39-76 s per rep, 8.6 min for this script; 512 MiB: 0.4 GB left, 0.8 s; a fully allocated
volume, as in make bench: under 1 s). So the mirror's drain depends on --burst-size far more
than journalpair's: compare them at the same size, and know that a smaller one favours the
mirror.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from benchlib.servers import MIRROR_JOB, POLL_S, QemuMirror, control_display

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
        self.control = work / "primary" / "ctl.sock"
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
        while not self.display().get("link", {}).get("up"):
            if time.monotonic() > deadline:
                raise RuntimeError("the pair did not connect")
            time.sleep(0.05)

    def display(self) -> dict[str, Any]:
        """The primary's display, from its control socket: cheap enough to poll while the
        daemons work (pairctl costs ~0.3 s of CPU per call, on 2 cores)."""
        return control_display(self.control)

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


def settle() -> None:
    """Write back every dirty page before a timed step, so that its FLUSH or fdatasync does
    not pay for the step before it, nor its copy compete with that step's writeback."""
    os.sync()


@contextlib.contextmanager
def started_pair(work: Path, size: int, image: Path | None) -> Iterator[Pair]:
    """A fresh pair (SMPL, link up) in work, its P-VOL a sparse copy of image; work is
    removed after, so that no later os.sync() writes back its dirty pages."""
    work.mkdir()
    pair = Pair(work, size, "1GiB", image)
    try:
        pair.start()
        settle()
        yield pair
    finally:
        pair.stop()
        shutil.rmtree(work)


@contextlib.contextmanager
def ready_mirror(work: Path, source: Path, size: int) -> Iterator[QemuMirror]:
    """make bench's QEMU mirror in work: qemu-storage-daemon exporting source while
    blockdev-mirror (sync=full, copy-mode=background) copies it to a fresh qemu-nbd target;
    started, and ready: the initial copy is done and the target flushed (fdatasync). work is
    removed after."""
    work.mkdir()
    mirror = QemuMirror(work, source, argparse.Namespace(size=size))
    settle()
    try:
        mirror.start()
        yield mirror
    finally:
        mirror.stop()
        shutil.rmtree(work)


def mirror_copy_s(mirror: QemuMirror) -> float:
    """Seconds from the job running to BLOCK_JOB_READY, by QEMU's own event times (as
    journalpair's copy is timed by its daemon's events)."""
    assert mirror.qmp is not None
    events = mirror.qmp.events

    def at(name: str, **data: str) -> float:
        for event in events:
            if event["event"] == name and data.items() <= event["data"].items():
                stamp = event["timestamp"]
                return float(stamp["seconds"] + stamp["microseconds"] / 1e6)
        raise RuntimeError(f"no QMP event {name} {data}")

    return at("BLOCK_JOB_READY", device=MIRROR_JOB) - at(
        "JOB_STATUS_CHANGE", id=MIRROR_JOB, status="running"
    )


def nbdcopy_time(image: Path, work: Path, size: int, flush: bool) -> float:
    """nbdcopy of image to a fresh qemu-nbd target (--cache=writeback: the data may still be
    in the page cache when nbdcopy ends); with flush, nbdcopy --flush, whose final NBD FLUSH
    qemu-nbd answers with fdatasync: durable, as journalpair's PAIR and the mirror's ready."""
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
        settle()
        start = time.monotonic()
        subprocess.run(["nbdcopy", *(["--flush"] if flush else []), str(image), uri], check=True)
        return time.monotonic() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
        target.unlink()


def fio_burst(uri: str, burst_s: int, output: Path) -> float:
    """fio 4k randwrite QD32 for burst_s seconds; its write IOPS."""
    settle()
    subprocess.run(
        ["fio", "--name=burst", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--iodepth=32", "--time_based", f"--runtime={burst_s}", "--output-format=json",
         f"--output={output}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(output.read_text())["jobs"][0]["write"]["iops"])


def burst(work: Path, size: int, burst_s: int) -> dict[str, float]:
    """journalpair: the burst on a paired empty volume, lag sampled every 0.25 s and at fio's
    end (peak); the lag at fio's end, then the time from there until lag.entries == 0."""
    with started_pair(work, size, None) as pair:
        pair.create_and_wait()
        peak = {"entries": 0, "bytes": 0, "seconds": 0.0}
        stop = threading.Event()

        def note(lag: dict[str, Any]) -> None:
            for key in peak:
                peak[key] = max(peak[key], lag.get(key, 0))

        def sample() -> None:
            while not stop.is_set():
                note(pair.display().get("lag", {}))
                stop.wait(0.25)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            iops = fio_burst(f"nbd://127.0.0.1:{pair.p_nbd}/vol0", burst_s, work / "fio.json")
            ended = time.monotonic()
            end_lag = pair.display()["lag"]
            note(end_lag)  # the sampler may have missed the last 0.25 s
            while pair.display()["lag"]["entries"] > 0:
                time.sleep(POLL_S)
            drain_s = time.monotonic() - ended
        finally:
            stop.set()
            sampler.join()
        return {
            "iops": iops,
            "end_lag_entries": end_lag["entries"],
            "end_lag_seconds": end_lag["seconds"],
            "peak_lag_entries": peak["entries"],
            "peak_lag_bytes": peak["bytes"],
            "peak_lag_seconds": peak["seconds"],
            "drain_s": drain_s,
        }


def mirror_burst(work: Path, size: int, burst_s: int) -> dict[str, float]:
    """The QEMU mirror: the same burst on an empty volume through qemu-storage-daemon's export
    once the job is ready; at fio's end the bytes the job has still to copy (len - offset:
    QEMU 7.2's query-block-jobs has no other measure of it; len grows by the 64 KiB
    granularity for each write to a clean chunk), then the time until the job has copied
    everything (offset == len, not busy: servers.QemuMirror.drain)."""
    work.mkdir()
    volume = work / "vol0.img"
    make_content(volume, size, 0.0)
    try:
        with ready_mirror(work / "mirror", volume, size) as mirror:
            iops = fio_burst(mirror.uri, burst_s, work / "fio.json")
            job = mirror.job()
            drain_s = mirror.drain()
    finally:
        shutil.rmtree(work)
    return {"iops": iops, "end_remaining_bytes": job["len"] - job["offset"], "drain_s": drain_s}


def copy_rep(rep_dir: Path, image: Path, empty: Path, size: int, results: dict[str, Any]) -> None:
    """One repetition of the initial copies, each to a fresh target: journalpair (then its
    resync), nbdcopy, nbdcopy --flush and the mirror of image; journalpair and the mirror of
    the empty volume."""
    with started_pair(rep_dir / "jp", size, image) as pair:
        results["copy"].append(pair.create_and_wait())
        results["resync"].append(pair.resync_after_changing(0.01, size))
    with started_pair(rep_dir / "jp-empty", size, empty) as pair:
        results["copy_empty"].append(pair.create_and_wait())
    results["nbdcopy"].append(nbdcopy_time(image, rep_dir, size, flush=False))
    results["nbdcopy_flush"].append(nbdcopy_time(image, rep_dir, size, flush=True))
    with ready_mirror(rep_dir / "mirror", image, size) as mirror:
        results["mirror_copy"].append(mirror_copy_s(mirror))
    with ready_mirror(rep_dir / "mirror-empty", empty, size) as mirror:
        results["mirror_copy_empty"].append(mirror_copy_s(mirror))


def fmt(xs: list[float]) -> str:
    """median [min-max]; counts and IOPS (1000 and over) without decimals."""
    if not xs:
        return "-"
    spec = ".0f" if statistics.median(xs) >= 1000 else ".2f"
    return f"{statistics.median(xs):{spec}} [{min(xs):{spec}}-{max(xs):{spec}}]"


def ratio(xs: list[float], ys: list[float]) -> str:
    """Per-repetition ratios xs[i] / ys[i], median [min-max]."""
    return fmt([x / y for x, y in zip(xs, ys, strict=True) if y])


def report(results: dict[str, Any], opts: argparse.Namespace, data: int) -> None:
    """The numbers against the issue's targets; times in seconds, lower is better."""
    r = results

    def line(label: str, value: str, target: str = "") -> None:
        print(f"  {label:<46} {value:<22} {target}".rstrip())

    print(f"initial copy, {opts.size} bytes {opts.fill:.0%} full ({data} bytes of data), s:")
    line("journalpair SMPL -> PAIR (S-VOL fdatasynced)", fmt(r["copy"]))
    line("nbdcopy to qemu-nbd (page cache)", fmt(r["nbdcopy"]))
    line("nbdcopy --flush to qemu-nbd (fdatasynced)", fmt(r["nbdcopy_flush"]))
    line("QEMU mirror job -> ready (target flushed)", fmt(r["mirror_copy"]))
    line("ratio journalpair / nbdcopy", ratio(r["copy"], r["nbdcopy"]), "target <= 1")
    line("ratio journalpair / nbdcopy --flush", ratio(r["copy"], r["nbdcopy_flush"]))
    line("ratio journalpair / QEMU mirror", ratio(r["copy"], r["mirror_copy"]))
    print("initial copy, the same volume empty (no data), s:")
    line("journalpair SMPL -> PAIR", fmt(r["copy_empty"]), "target < 2 s")
    line("QEMU mirror job -> ready", fmt(r["mirror_copy_empty"]))
    line("ratio journalpair / QEMU mirror", ratio(r["copy_empty"], r["mirror_copy_empty"]))
    resync_s = [x["seconds"] for x in r["resync"]]
    print("resync after changing 1% while split:")
    line("seconds", fmt(resync_s))
    line("bytes sent", fmt([x["bytes"] for x in r["resync"]]))
    line("ratio resync / full initial copy (time)", ratio(resync_s, r["copy"]), "target <= 0.05")
    print(f"burst: fio 4k randwrite QD32 {opts.burst_s} s, empty {opts.burst_size}-byte volume;"
          " drain from fio's end:")  # fmt: skip
    for key in r["burst"][0]:
        target = "target <= 2 s" if key == "drain_s" else ""
        line(f"journalpair {key}", fmt([b[key] for b in r["burst"]]), target)
    for key in r["mirror_burst"][0]:
        line(f"QEMU mirror {key}", fmt([b[key] for b in r["mirror_burst"]]))
    drains = [[b["drain_s"] for b in r[k]] for k in ("burst", "mirror_burst")]
    line("ratio drain journalpair / QEMU mirror", ratio(*drains), "target <= 1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=2 << 30)
    p.add_argument("--fill", type=float, default=0.25)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--burst-s", type=int, default=20)
    p.add_argument("--burst-size", type=int, default=512 << 20)
    opts = p.parse_args()
    started = time.monotonic()
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pipeline-", dir=RESULTS))
    results: dict[str, Any] = {"settings": vars(opts)} | {
        key: []
        for key in ("copy", "copy_empty", "nbdcopy", "nbdcopy_flush", "mirror_copy",
                    "mirror_copy_empty", "resync", "burst", "mirror_burst")
    }  # fmt: skip
    try:
        image, empty = work / "content.img", work / "empty.img"
        data = make_content(image, opts.size, opts.fill)
        make_content(empty, opts.size, 0.0)
        print(f"content: {opts.size} bytes, {data} bytes of data", file=sys.stderr)
        for rep in range(opts.reps):
            rep_dir = work / f"rep{rep}"
            rep_dir.mkdir()
            copy_rep(rep_dir, image, empty, opts.size, results)
            print(f"rep {rep} (at {time.monotonic() - started:.0f} s): " + ", ".join(
                f"{key} {results[key][-1]:.2f} s"
                for key in ("copy", "copy_empty", "nbdcopy", "nbdcopy_flush", "mirror_copy",
                            "mirror_copy_empty")
            ), file=sys.stderr)  # fmt: skip
            shutil.rmtree(rep_dir)
        for rep in range(opts.reps):
            rep_dir = work / f"burst{rep}"
            rep_dir.mkdir()
            results["burst"].append(burst(rep_dir / "jp", opts.burst_size, opts.burst_s))
            results["mirror_burst"].append(
                mirror_burst(rep_dir / "qemu", opts.burst_size, opts.burst_s)
            )
            print(f"burst {rep} (at {time.monotonic() - started:.0f} s): {results['burst'][-1]}, "
                  f"mirror {results['mirror_burst'][-1]}", file=sys.stderr)  # fmt: skip
            shutil.rmtree(rep_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = RESULTS / time.strftime("pipeline-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    report(results, opts, data)
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
