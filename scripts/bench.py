"""make bench: fio over NBD against journalpair, qemu-nbd and a QEMU mirror, side by side.

    random content file (--size), made once
      │
      for rep in 1..--reps:                          interleaved: A B C A B C A B C
        for server in SERVERS (--servers):
          fresh copy of the content file, fsync      (same data, same file system)
          start:  journalpair  primaryd + secondaryd, pairctl create ─► wait PAIR
                  qemu-nbd     -t --cache=writeback, no replication (the reference)
                  qemu-mirror  qemu-storage-daemon NBD export + blockdev-mirror (background)
                               to a qemu-nbd target ─► wait until the job is ready
          for job in JOBS (--only) the server runs:  (the mirror: the write jobs)
            reset peak RSS; fio --ioengine=nbd ──► IOPS, MiB/s, latency
            drain: until the replica has every write ──► seconds
            CPU (utime+stime) over fio + drain / requests; peak RSS per process
            sync (the next job starts with no dirty pages)
          stop (SIGTERM); replica == volume, byte for byte
      │
    bench_pipeline.py (initial copy vs nbdcopy and the mirror, resync, lag under a burst vs
    the mirror's convergence), its JSON folded in
      │
    tables: throughput median [min-max] and per-rep ratios jp/qemu-nbd, jp/mirror; CPU per
            request and peak RSS per process; drain and initial copy times; p99 latency
    raw results: bench-results/bench-YYYYmmdd-HHMMSS.json

To add a job, append to JOBS (a FioJob, or a Job subclass whose run() measures something else).
To add a server, subclass benchlib.servers.Server and add it to SERVERS there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import report
from benchlib.jobs import BacklogJob, FioJob, Job, JobError
from benchlib.procs import ProcError
from benchlib.qmp import QmpError
from benchlib.servers import EXPORT, ROOT, SERVERS, Server, ServerError

RESULTS_DIR = ROOT / "bench-results"
PIPELINE = ROOT / "scripts" / "bench_pipeline.py"
PIPELINE_ARGS = "--reps 3 --burst-s 20"
COPY_CHUNK_BYTES = 1 << 20

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

JOBS: list[Job] = [
    FioJob("randwrite-4k-qd32", "4k random write, QD32", "IOPS", "iops", "randwrite", "4k", 32),
    FioJob("randread-4k-qd32", "4k random read, QD32", "IOPS", "iops", "randread", "4k", 32),
    FioJob("write-1m-qd8", "1 MiB seq write, QD8", "MiB/s", "bw_mib_s", "write", "1M", 8),
    FioJob("read-1m-qd8", "1 MiB seq read, QD8", "MiB/s", "bw_mib_s", "read", "1M", 8),
    FioJob("randwrite-4k-qd1", "4k random write, QD1", "IOPS", "iops", "randwrite", "4k", 1),
    FioJob(
        "randwrite-4k-qd1-flush",
        "4k random write, QD1, NBD FLUSH after each write",
        "IOPS",
        "iops",
        "randwrite",
        "4k",
        1,
        fsync=1,
    ),
    BacklogJob("backlog", "1 GiB written, secondaryd stopped; catch-up", "MiB/s", "bw_mib_s"),
]

ERRORS = (ServerError, JobError, ProcError, QmpError, OSError, subprocess.SubprocessError)


def parse_size(text: str) -> int:
    """'1GiB', '64MiB', '512k', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1GiB, 64MiB, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


# ---------------------------------------------------------------------------------- running


def make_content(path: Path, size: int) -> None:
    """Random bytes, so reads hit data (not holes) and nothing compresses or dedups."""
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, COPY_CHUNK_BYTES)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with dst.open("rb+") as f:
        os.fsync(f.fileno())


def run_jobs(server: Server, jobs: list[Job], rep: int, opts: argparse.Namespace) -> list[Any]:
    runs = []
    for job in jobs:
        if not job.runs_on(type(server)):
            continue
        result = job.run(server, opts)
        start = time.monotonic()
        os.sync()  # the next job does not pay for this one's dirty pages
        result["sync_after_s"] = round(time.monotonic() - start, 3)
        runs.append({"job": job.name, "server": server.name, "rep": rep} | result)
        cpu = sum(result["cpu_us_per_req"].values())
        drain = "" if result["drain_s"] is None else f"  drain {result['drain_s']:.2f} s"
        rss = "/".join(f"{v:.0f}" for v in result["rss_peak_mib"].values())
        print(
            f"  {job.name:<22} rep {rep}/{opts.reps}  {server.name:<11}"
            f" {result[job.key]:>9.0f} {job.unit:<5}  {cpu:6.1f} us/req  RSS {rss} MiB{drain}",
            file=sys.stderr,
        )
    return runs


def run_instance(
    server_cls: type[Server], jobs: list[Job], rep: int, work: Path, content: Path,
    opts: argparse.Namespace, runs: list[Any], instances: list[Any],
) -> None:  # fmt: skip
    """Start one server, run every job it runs, stop it, compare its replica with the volume."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{server_cls.name}-", dir=work))
    volume = run_dir / f"{EXPORT}.img"
    record: dict[str, Any] = {"server": server_cls.name, "rep": rep}
    try:
        copy_synced(content, volume)
        server = server_cls(run_dir, volume, opts)
        start = time.monotonic()
        try:
            server.start()
            record["start_s"] = round(time.monotonic() - start, 3)
            record |= server.setup
            runs += run_jobs(server, jobs, rep, opts)
        except BaseException:
            record["stop"] = server.stop()
            print(f"    {server_cls.name} logs:\n{server.log_tails()}", file=sys.stderr)
            raise
        record["stop"] = server.stop()
        record |= server.verify()
        if record.get("replica_equal") is False:
            where = record["first_difference"]
            print(f"    {server_cls.name}: replica differs at byte {where}", file=sys.stderr)
    finally:
        instances.append(record)
        if not opts.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def run_all(
    jobs: list[Job], servers: list[type[Server]], work: Path, opts: argparse.Namespace,
    runs: list[Any], instances: list[Any],
) -> None:  # fmt: skip
    """Append to runs and instances (kept by the caller, so an error keeps what ran)."""
    content = work / "content.img"
    print(f"bench: writing {opts.size} bytes of random content in {work}", file=sys.stderr)
    make_content(content, opts.size)
    for rep in range(1, opts.reps + 1):
        for server_cls in servers:
            run_instance(server_cls, jobs, rep, work, content, opts, runs, instances)


def run_pipeline(args: str) -> dict[str, Any]:
    """bench_pipeline.py through its command line; its results JSON, and where it was."""
    before = set(RESULTS_DIR.glob("pipeline-*.json"))
    cmd = [sys.executable, str(PIPELINE), *shlex.split(args)]
    print(f"bench: {' '.join(cmd[1:])}", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise JobError(f"bench_pipeline.py exited with status {proc.returncode}")
    printed = re.findall(r"^raw results: (\S+)\s*$", proc.stdout, re.MULTILINE)
    path = Path(printed[-1]) if printed else None
    if path is None or not path.is_file():
        new = sorted(set(RESULTS_DIR.glob("pipeline-*.json")) - before)
        if not new:
            raise JobError("bench_pipeline.py wrote no bench-results/pipeline-*.json")
        path = new[-1]
    doc: dict[str, Any] = json.loads(path.read_text())
    return {"path": str(path), "results": doc}


# ------------------------------------------------------------------------------------- main


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.stdout or out.stderr else ""


def git_commit() -> str | None:
    """The checked-out commit (read only), or None outside a repository or before any commit."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_changed() -> list[str]:
    """Files changed in the working tree (read only): the daemons run from it, not from HEAD."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else []


def environment(work: Path) -> dict[str, Any]:
    return {
        "fio": tool_version(["fio", "--version"]),
        "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
        "qemu-storage-daemon": tool_version(["qemu-storage-daemon", "--version"]),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "filesystem": tool_version(["stat", "-f", "-c", "%T", str(work)]),
        "commit": git_commit(),
        "changed_files": git_changed(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    job_names = [j.name for j in JOBS]
    server_names = [s.name for s in SERVERS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default 5)")
    p.add_argument("--ramp-time", type=int, default=1, help="fio warm-up seconds (default 1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="volume size (default 1GiB)")
    p.add_argument(
        "--journal", default="4GiB", help="journal capacity of each daemon (default 4GiB)"
    )
    p.add_argument(
        "--backlog",
        type=parse_size,
        default=1 << 30,
        help="bytes written with secondaryd stopped in the backlog job (default 1GiB)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=job_names,
        metavar="JOB",
        help=f"run only this job (repeatable): {', '.join(job_names)}",
    )
    p.add_argument(
        "--servers",
        default=",".join(s.name for s in SERVERS if s.by_default),
        help=f"comma-separated subset of: {', '.join(server_names)} (default: all but "
        "journalpair-metrics, which is journalpair with metrics.listen set)",
    )
    p.add_argument(
        "--pipeline-args",
        default=PIPELINE_ARGS,
        help=f"arguments for bench_pipeline.py (default {PIPELINE_ARGS!r})",
    )
    p.add_argument("--no-pipeline", action="store_true", help="do not run bench_pipeline.py")
    p.add_argument(
        "--workdir",
        type=Path,
        default=RESULTS_DIR,
        help="where volume files go (default bench-results/; same fs for all)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    opts = p.parse_args(argv)
    unknown = set(opts.servers.split(",")) - set(server_names)
    if unknown:
        p.error(f"--servers: unknown {', '.join(sorted(unknown))}")
    if opts.reps < 1 or opts.runtime < 1 or opts.ramp_time < 0:
        p.error("--reps and --runtime must be >= 1, --ramp-time >= 0")
    if opts.size < (1 << 20) or opts.size % 512:
        p.error("--size must be at least 1MiB and a multiple of 512")
    if opts.backlog < (1 << 20):
        p.error("--backlog must be at least 1MiB")
    return opts


def write_results(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def print_tables(doc: dict[str, Any], jobs: list[Job], servers: list[str]) -> None:
    runs, instances, opts = doc["runs"], doc["instances"], doc["settings"]
    ran = [j for j in jobs if any(r["job"] == j.name for r in runs)]
    print()
    print(
        f"{len(runs)} runs in {len(instances)} server starts; fio {opts['runtime']} s"
        f" (+{opts['ramp_time']} s ramp), volume {opts['size']} bytes, {opts['reps']} reps;"
        f" ratios per rep, median [min-max]"
    )
    sections = [
        report.throughput_table(runs, ran, servers),
        report.cpu_table(runs, ran, servers),
        report.rss_table(runs, ran, servers),
        report.replica_table(runs, ran, instances, servers),
        report.latency_table(runs, ran, servers),
        report.checks(runs, instances),
    ]
    pipeline = doc.get("pipeline")
    if isinstance(pipeline, dict) and "results" in pipeline:
        sections.append(report.pipeline_lines(pipeline["results"]))
    for lines in sections:
        if lines:
            print()
            print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse_args(argv)
    jobs = [j for j in JOBS if not opts.only or j.name in opts.only]
    wanted = opts.servers.split(",")
    servers = [s for s in SERVERS if s.name in wanted]
    RESULTS_DIR.mkdir(exist_ok=True)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=opts.workdir))
    out_path = RESULTS_DIR / time.strftime("bench-%Y%m%d-%H%M%S.json")
    doc: dict[str, Any] = {
        "settings": vars(opts), "environment": environment(work), "runs": [], "instances": []
    }  # fmt: skip
    status = 0
    try:
        run_all(jobs, servers, work, opts, doc["runs"], doc["instances"])
        if not opts.no_pipeline:
            doc["pipeline"] = run_pipeline(opts.pipeline_args)
    except ERRORS as e:
        print(f"bench: error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        status = 130
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        doc["wall_s"] = round(time.monotonic() - started, 1)
        with contextlib.suppress(OSError):
            write_results(out_path, doc)
    if any(i.get("replica_equal") is False for i in doc["instances"]):
        status = status or 1  # a replica that differs makes every number above suspect
    print_tables(doc, jobs, [s.name for s in servers])
    print(f"\nwall time {doc['wall_s']:.0f} s; raw results: {out_path.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
