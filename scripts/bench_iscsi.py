"""make bench-iscsi: our iSCSI target against Debian's tgt (tgtd), side by side, in one run.

    sparse LUN files of --size
      │
      start journalpair  python -m common.iscsi.standalone      LUN 0 = the file
            tgt          tgtd -f -C CONTROL --iscsi portal=127.0.0.1:PORT, then tgtadm:
                         target 1, LUN 1 = the file (bs rdwr, thin_provisioning=1),
                         bind ALL                               (tgt's LUN 0 is its controller)
            primaryd     (not with --no-primaryd) primaryd serving iSCSI (iscsi.listen), LUN 0
                         = the file, paired with a secondaryd (benchlib.servers.JournalPair:
                         pairctl create, wait PAIR): every write journaled and replicated
      │
    conformance: scripts/iscsi_conformance.py's selection of iscsi-test-cu on journalpair, tgt
                 ──► one table: test, journalpair, tgt; totals; why each non-pass
      │
    throughput, for rep in 1..--reps, the targets' order alternating (jp tgt pd, pd tgt jp, ...):
        qemu-img bench   1 MiB sequential write / read, QD8; 4 KiB strided write, QD32
                         (qemu-img bench has no random mode: offsets step by 4 KiB x 7919)
        iscsi-perf -r    4 KiB random read, QD32, for --perf-s seconds
      ──► MiB/s and IOPS median per target, the ratio to tgt per rep: median [min-max]
      │
    bench-results/bench-iscsi-YYYYmmdd-HHMMSS.json (+ each target's iscsi-test-cu output)

Needs root for tgtd (make bench-iscsi installs Debian's tgt when tgtd is missing). The whole
run takes about two minutes; the machine is shared, so read the ratios, not the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import iscsi_conformance
import yaml
from benchlib.servers import ROOT, JournalPair, ServerError, free_port, spawn, stop_process, tail

RESULTS_DIR = ROOT / "bench-results"
JP_IQN = "iqn.2026-01.org.journalpair:bench"
PD_IQN = "iqn.2026-01.org.journalpair:bench-primaryd"
PD_JOURNAL = "2GiB"  # the primary's and the secondary's: the jobs write about 600 MiB
TGT_IQN = "iqn.2026-01.org.tgt:bench"
READY_TIMEOUT_S = 15.0
JOB_TIMEOUT_S = 120.0
MiB = 1 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class BenchError(RuntimeError):
    pass


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)(i?b)?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 256MiB, 1GiB)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def run(cmd: list[str], timeout_s: float = 30.0) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr or proc.stdout}")
    return proc.stdout


def poll(what: str, ready: Any, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready after {READY_TIMEOUT_S} s:\n{tail(log)}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------ the targets


@dataclasses.dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    control: int = 0  # tgtd's control port (tgtadm -C), 0 for ours

    def stop(self) -> dict[str, Any]:
        if self.control and self.proc.poll() is None:
            # tgtd ignores SIGTERM; it exits on "delete system" once no target is left
            for cmd in (
                ["--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1", "--force"],
                ["--op", "delete", "--mode", "system"],
            ):
                subprocess.run(["tgtadm", "-C", str(self.control), *cmd], capture_output=True)
        return stop_process(self.proc)


def start_journalpair(run_dir: Path, lun: Path) -> Target:
    port = free_port()
    log = run_dir / "journalpair.log"
    cmd = [sys.executable, "-m", "common.iscsi.standalone", "--listen", f"127.0.0.1:{port}"]
    proc = spawn([*cmd, "--iqn", JP_IQN, "--lun", str(lun)], log)
    poll("the journalpair target", lambda: "listening on" in log.read_text(), proc, log)
    return Target("journalpair", f"iscsi://127.0.0.1:{port}/{JP_IQN}/0", proc, log)


def start_tgt(run_dir: Path, lun: Path) -> Target:
    port, control = free_port(), random.randrange(10000, 20000)  # tgtd refuses > 32767
    log = run_dir / "tgtd.log"
    cmd = ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"]
    proc = spawn(cmd, log)
    target = Target("tgt", f"iscsi://127.0.0.1:{port}/{TGT_IQN}/1", proc, log, control)

    LUN_1 = ["--mode", "logicalunit", "--tid", "1", "--lun", "1"]

    def tgtadm(*args: str) -> subprocess.CompletedProcess[str]:
        argv = ["tgtadm", "-C", str(control), "--lld", "iscsi", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10)

    try:
        poll("tgtd", lambda: tgtadm("--op", "show", "--mode", "target").returncode == 0, proc, log)
        for args in (
            ["--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN],
            [*LUN_1, "--op", "new", "-b", str(lun)],
            # thin provisioning on, as issue 8 asks of ours (UNMAP, WRITE SAME 16 UNMAP)
            [*LUN_1, "--op", "update", "--params", "thin_provisioning=1"],
            ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
        ):
            done = tgtadm(*args)
            if done.returncode != 0:
                raise BenchError(f"tgtadm {' '.join(args)}: {done.stderr or done.stdout}")
    except BaseException:
        target.stop()
        raise
    return target


class IscsiPair(JournalPair):
    """primaryd and secondaryd (bench.py's pair), the primary also serving iSCSI."""

    def __init__(self, run_dir: Path, volume: Path, size: int) -> None:
        self.iscsi_port = free_port()  # (before super(): it writes the configs)
        super().__init__(run_dir, volume, argparse.Namespace(size=size, journal=PD_JOURNAL))

    def _config(self, role: str, volume: Path, listen: dict[str, str], repl: str) -> Path:
        path = super()._config(role, volume, listen, repl)
        if role == "primary":
            config = yaml.safe_load(path.read_text())
            config["iscsi"] = {"listen": f"127.0.0.1:{self.iscsi_port}", "iqn": PD_IQN}
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


@dataclasses.dataclass
class PrimarydTarget:
    name: str
    url: str
    pair: IscsiPair

    def stop(self) -> dict[str, Any]:
        stopped = self.pair.stop()
        return {
            "killed": any(r["killed"] for r in stopped.values()),
            "exit": max(abs(r["exit"] or 0) for r in stopped.values()),
        }


def start_primaryd(run_dir: Path, lun: Path) -> PrimarydTarget:
    site = run_dir / "pair"
    site.mkdir()
    pair = IscsiPair(site, lun, lun.stat().st_size)
    target = PrimarydTarget("primaryd", f"iscsi://127.0.0.1:{pair.iscsi_port}/{PD_IQN}/0", pair)
    try:
        pair.start()  # NBD export up, link up, pair created and in PAIR
    except BaseException:
        target.stop()
        raise
    return target


@contextlib.contextmanager
def targets(run_dir: Path, size: int, primaryd: bool) -> Iterator[list[Any]]:
    started: list[Any] = []
    starts: list[tuple[str, Callable[[Path, Path], Any]]]
    starts = [("journalpair", start_journalpair), ("tgt", start_tgt)]
    starts += [("primaryd", start_primaryd)] if primaryd else []
    try:
        for name, start in starts:
            lun = run_dir / f"{name}-lun.img"
            with lun.open("wb") as f:
                f.truncate(size)
            started.append(start(run_dir, lun))
        yield started
    finally:
        for target in started:
            result = target.stop()
            if result["killed"] or (target.name != "tgt" and result["exit"] != 0):
                print(f"warning: {target.name} stopped badly: {result}", file=sys.stderr)


# ------------------------------------------------------------------------------ conformance


def conformance(ts: list[Any], run_dir: Path) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for target in ts:
        if target.name == "primaryd":  # the same core as journalpair's: throughput only
            continue
        raw: list[str] = []
        start = time.monotonic()
        results = iscsi_conformance.run_conformance(target.url, raw_output=raw)
        took = time.monotonic() - start
        (run_dir / f"{target.name}-iscsi-test-cu.txt").write_text("".join(raw))
        print(f"  {target.name}: {len(results)} tests in {took:.1f} s", file=sys.stderr)
        out[target.name] = [dataclasses.asdict(r) for r in results]
    return out


def print_conformance(results: dict[str, list[dict[str, str]]]) -> None:
    names = list(results)
    by_name = {t: {r["name"]: r for r in rs} for t, rs in results.items()}
    tests = list(dict.fromkeys(r["name"] for rs in results.values() for r in rs))
    width = max(len(t) for t in tests) + 2
    print(f"\niscsi-test-cu ({len(tests)} tests, scripts/iscsi_conformance.py's selection)")
    print(f"{'test':{width}}" + "".join(f"{n:14}" for n in names))
    for test in tests:
        cells = [by_name[n].get(test, {}).get("outcome", "-") for n in names]
        print(f"{test:{width}}" + "".join(f"{c:14}" for c in cells))
    for outcome in ("passed", "failed", "skipped"):
        counts = [sum(r["outcome"] == outcome for r in results[n]) for n in names]
        print(f"{'total ' + outcome:{width}}" + "".join(f"{c:<14}" for c in counts))
    print("\nwhy (the first two lines of each non-pass):")
    for test in tests:
        for n in names:
            r = by_name[n].get(test)
            if r and r["outcome"] != "passed":
                why = " | ".join(r["message"].splitlines()[:2])
                print(f"  {test} on {n}: {r['outcome']}: {why}")


# ------------------------------------------------------------------------------- throughput


@dataclasses.dataclass
class Job:
    name: str
    title: str
    write: bool = False
    request_bytes: int = 4096
    depth: int = 32
    count: int = 0  # qemu-img bench: this many requests
    step_bytes: int = 0  # qemu-img bench: offset step (0: sequential)
    random_read_s: float = 0.0  # iscsi-perf -r for this long instead

    def run(self, url: str) -> dict[str, float]:
        if self.random_read_s:
            return self._iscsi_perf(url)
        cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(self.count), "-d", str(self.depth)]
        cmd += ["-s", str(self.request_bytes), *(["-w"] if self.write else [])]
        cmd += ["-S", str(self.step_bytes)] if self.step_bytes else []
        out = run([*cmd, url], JOB_TIMEOUT_S)
        m = re.search(r"Run completed in ([\d.]+) seconds", out)
        if not m:
            raise BenchError(f"qemu-img bench printed no time:\n{out}")
        seconds = float(m.group(1))
        return self._rates(self.count / seconds, seconds)

    def _iscsi_perf(self, url: str) -> dict[str, float]:
        blocks = str(self.request_bytes // 512)
        cmd = ["iscsi-perf", "-r", "-m", str(self.depth), "-b", blocks]
        out = run([*cmd, "-t", str(int(self.random_read_s)), url], JOB_TIMEOUT_S)
        found = re.findall(r"iops average (\d+) ", out.replace("\r", "\n"))
        if not found:
            raise BenchError(f"iscsi-perf printed no average:\n{out[-2000:]}")
        return self._rates(float(found[-1]), self.random_read_s)

    def _rates(self, iops: float, seconds: float) -> dict[str, float]:
        mib_s = iops * self.request_bytes / MiB
        return {"iops": round(iops, 1), "mib_s": round(mib_s, 2), "seconds": round(seconds, 3)}


def jobs(args: argparse.Namespace) -> list[Job]:
    seq = int(args.seq_bytes // MiB)
    return [
        Job("write-1m-qd8", "1 MiB seq write, QD8", True, MiB, 8, count=seq),
        Job("read-1m-qd8", "1 MiB seq read, QD8", False, MiB, 8, count=seq),
        Job(
            "write-4k-qd32",
            "4 KiB strided write, QD32",
            True,
            4096,
            32,
            args.small_writes,
            4096 * 7919,
        ),
        Job("randread-4k-qd32", "4 KiB random read, QD32", random_read_s=args.perf_s),
    ]


def throughput(ts: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for rep in range(1, args.reps + 1):
        order = ts if rep % 2 else list(reversed(ts))
        for job in jobs(args):
            for target in order:
                result = job.run(target.url)
                runs.append({"rep": rep, "job": job.name, "target": target.name} | result)
                print(f"  rep {rep} {job.name:18} {target.name:12} {result}", file=sys.stderr)
    return runs


def print_throughput(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ours = [n for n in ("journalpair", "primaryd") if any(r["target"] == n for r in runs)]
    print(f"\nthroughput: median [min-max] over {args.reps} reps, ratio = ours/tgt per rep")
    print(
        f"{'job':28}"
        + "".join(f"{n:>24}" for n in [*ours, "tgt"])
        + "".join(f"{'ratio ' + n[:2] + '/tgt':>22}" for n in ours)
    )
    for job in jobs(args):
        unit, key = ("IOPS", "iops") if job.request_bytes < MiB else ("MiB/s", "mib_s")

        def values(target: str, job: Job = job, key: str = key) -> dict[int, float]:
            return {
                r["rep"]: r[key] for r in runs if r["job"] == job.name and r["target"] == target
            }

        tgt = values("tgt")
        cells = [fmt(list(values(n).values()), ".0f") for n in [*ours, "tgt"]]
        for name in ours:
            mine = values(name)
            ratios = [mine[rep] / tgt[rep] for rep in sorted(mine.keys() & tgt.keys()) if tgt[rep]]
            cells.append(fmt(ratios, ".2f"))
        widths = [24] * (len(ours) + 1) + [22] * len(ours)
        print(
            f"{job.title + ' (' + unit + ')':28}"
            + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )


def fmt(xs: list[float], spec: str) -> str:
    if not xs:
        return "-"
    mid = statistics.median(xs)
    return f"{mid:{spec}} [{min(xs):{spec}}-{max(xs):{spec}}]" if len(xs) > 1 else f"{mid:{spec}}"


# ----------------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    def deb(name: str) -> str:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True)
        return done.stdout.decode() or "?"

    return {p: deb(p) for p in ("tgt", "libiscsi-bin", "qemu-utils", "qemu-block-extra")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256MiB"), help="LUN size")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seq-bytes", type=parse_size, default=parse_size("512MiB"))
    parser.add_argument("--small-writes", type=int, default=20000, help="4 KiB writes per run")
    parser.add_argument("--perf-s", type=float, default=3.0, help="iscsi-perf seconds per run")
    parser.add_argument("--no-conformance", action="store_true")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument(
        "--no-primaryd", action="store_true", help="without primaryd (paired) serving iSCSI"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: tgtd needs root (run as root, or through sudo)", file=sys.stderr)
        return 2
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"args": vars(args), "versions": versions(), "nproc": os.cpu_count()}
    report["loadavg_start"] = os.getloadavg()
    start = time.monotonic()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-iscsi-") as tmp,
            targets(Path(tmp), args.size, not args.no_primaryd) as ts,
        ):
            # tgt's LUN 0 is its controller: its disk is LUN 1, ours LUN 0
            report["urls"] = {t.name: t.url for t in ts}
            if not args.no_conformance:
                print("conformance (iscsi-test-cu)...", file=sys.stderr)
                report["conformance"] = conformance(ts, Path(tmp))
                for name in report["conformance"]:
                    out = Path(tmp) / f"{name}-iscsi-test-cu.txt"
                    out.replace(RESULTS_DIR / f"bench-iscsi-{stamp}-{name}-iscsi-test-cu.txt")
            if not args.no_throughput:
                print("throughput (qemu-img bench, iscsi-perf)...", file=sys.stderr)
                report["throughput"] = throughput(ts, args)
    except (BenchError, ServerError, iscsi_conformance.ConformanceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["loadavg_end"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - start, 1)
    print("\n".join(f"{name}: {url}" for name, url in report["urls"].items()))
    if "conformance" in report:
        print_conformance(report["conformance"])
    if "throughput" in report:
        print_throughput(report["throughput"], args)
    path = RESULTS_DIR / f"bench-iscsi-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    load = report["loadavg_start"][0], report["loadavg_end"][0]
    print(f"\n{report['seconds']} s; load average {load[0]:.1f} -> {load[1]:.1f}; raw: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
