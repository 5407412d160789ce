"""make bench: fio over NBD against primaryd and against qemu-nbd, side by side.

    random content file (--size), made once
      │
      for job in JOBS (--only):                     4k randwrite/randread QD32, 1M write/read QD8
        for rep in 1..--reps:
          for server in SERVERS (--servers):        interleaved: A B A B A B
            fresh copy of the content file, fsync   (same data, same file system, clean cache)
            start the server on a free port ──► wait until the export answers (nbdinfo)
            fio --ioengine=nbd --output-format=json ──► IOPS, bandwidth, latency
            SIGTERM, wait
      │
    table: median [min-max] per job and server, ratio of each server to qemu-nbd
    raw results: bench-results/bench-YYYYmmdd-HHMMSS.json

To add a job, append to JOBS (a FioJob, or a subclass of Job whose run() measures something
else: replication lag, initial copy, a QEMU mirror). To add a server, subclass Server and add it
to SERVERS; start() returns a Running handle whose uri the jobs connect to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench-results"
EXPORT = "vol0"
REFERENCE = "qemu-nbd"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
COPY_CHUNK_BYTES = 1 << 20
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'1GiB', '64MiB', '512k', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1GiB, 64MiB, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------- servers


@dataclass
class Running:
    """A server process serving EXPORT at uri; stop() sends SIGTERM and waits."""

    name: str
    proc: subprocess.Popen[bytes]
    uri: str
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> dict[str, Any]:
        start = time.monotonic()
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                self.proc.wait()
        return {
            "stop_s": round(time.monotonic() - start, 3),
            "killed": killed,
            "exit_status": self.proc.returncode,
        }


class ServerError(RuntimeError):
    pass


class Server:
    """Serves one volume file as export EXPORT on 127.0.0.1."""

    name = "?"

    def command(self, run_dir: Path, volume: Path, size: int, port: int) -> list[str]:
        raise NotImplementedError

    def start(self, run_dir: Path, volume: Path, size: int) -> Running:
        port = free_port()
        cmd = self.command(run_dir, volume, size, port)
        log_path = run_dir / f"{self.name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop the server ourselves
            )
        running = Running(self.name, proc, f"nbd://127.0.0.1:{port}/{EXPORT}", log_path)
        try:
            wait_export(running, size)
        except BaseException:
            running.stop()
            raise
        return running


class QemuNbd(Server):
    name = "qemu-nbd"

    def command(self, run_dir: Path, volume: Path, size: int, port: int) -> list[str]:
        return [
            "qemu-nbd",
            "-f", "raw", "-t", "-x", EXPORT,
            "-p", str(port), "-b", "127.0.0.1",
            "--cache=writeback", "--shared=8",
            str(volume),
        ]  # fmt: skip


class Primaryd(Server):
    name = "primaryd"

    def command(self, run_dir: Path, volume: Path, size: int, port: int) -> list[str]:
        config = {
            "role": "primary",
            "group": "bench",
            "data_dir": str(run_dir / "data"),
            "listen": {
                "nbd": f"127.0.0.1:{port}",
                "replication": f"127.0.0.1:{free_port()}",
            },
            "control": str(control_socket_path(run_dir)),
            "journal": {"capacity": "1GiB"},
            "volumes": [{"name": EXPORT, "path": str(volume), "size": size}],
        }
        (run_dir / "data").mkdir(exist_ok=True)
        config_path = run_dir / "primary.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [str(venv_bin("primaryd")), "--config", str(config_path)]


SERVERS: list[Server] = [Primaryd(), QemuNbd()]


def venv_bin(name: str) -> Path:
    here = Path(sys.executable).parent / name
    return here if here.exists() else ROOT / ".venv" / "bin" / name


def control_socket_path(run_dir: Path) -> Path:
    path = run_dir / "control.sock"
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    short = Path(tempfile.mkdtemp(prefix="jp-bench-"))  # left behind: an empty directory
    return short / "control.sock"


def wait_export(running: Running, size: int) -> None:
    """Poll with a real NBD client until the export answers with the right size."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            raise ServerError(
                f"{running.name} exited with status {running.proc.returncode} before serving;"
                f" its log:\n{tail(running.log_path)}"
            )
        probe = subprocess.run(
            ["nbdinfo", "--size", running.uri], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            if int(probe.stdout.strip()) != size:
                raise ServerError(f"{running.name}: export size {probe.stdout.strip()} != {size}")
            return
        last = probe.stderr.strip()
        time.sleep(0.1)
    raise ServerError(
        f"{running.name}: {running.uri} not ready after {READY_TIMEOUT_S}s ({last});"
        f" its log:\n{tail(running.log_path)}"
    )


# ------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    unit: str  # how the summary labels the value of key
    key: str  # the result field the summary reports: "iops", "bw_mib_s", ...

    def run(self, running: Running, run_dir: Path, opts: argparse.Namespace) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class FioJob(Job):
    rw: str = "randread"
    bs: str = "4k"
    iodepth: int = 1
    numjobs: int = 1

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"

    def fio_command(self, uri: str, output: Path, opts: argparse.Namespace) -> list[str]:
        return [
            "fio",
            f"--name={self.name}",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={self.rw}",
            f"--bs={self.bs}",
            f"--iodepth={self.iodepth}",
            f"--numjobs={self.numjobs}",
            "--group_reporting",
            "--time_based",
            f"--runtime={opts.runtime}",
            f"--ramp_time={opts.ramp_time}",
            "--output-format=json",
            f"--output={output}",
        ]

    def run(self, running: Running, run_dir: Path, opts: argparse.Namespace) -> dict[str, Any]:
        output = run_dir / "fio.json"
        cmd = self.fio_command(running.uri, output, opts)
        timeout_s = opts.runtime + opts.ramp_time + 120
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0 or not output.exists():
            raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        report = json.loads(output.read_text())
        job = report["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio job error {job['error']}: {proc.stderr.strip()[-2000:]}")
        return self.metrics(job[self.direction]) | {"fio": report}

    def metrics(self, side: dict[str, Any]) -> dict[str, Any]:
        clat = side.get("clat_ns", {})
        pct = clat.get("percentile", {})
        bw_bytes = float(side["bw_bytes"])
        return {
            "iops": float(side["iops"]),
            "bw_bytes": bw_bytes,
            "bw_mib_s": bw_bytes / (1 << 20),
            "clat_mean_us": clat.get("mean", 0.0) / 1000,
            "clat_p50_us": pct.get("50.000000", 0) / 1000,
            "clat_p99_us": pct.get("99.000000", 0) / 1000,
        }


JOBS: list[Job] = [
    FioJob("randwrite-4k-qd32", "4k random write, QD32", "IOPS", "iops", "randwrite", "4k", 32),
    FioJob("randread-4k-qd32", "4k random read, QD32", "IOPS", "iops", "randread", "4k", 32),
    FioJob("write-1m-qd8", "1 MiB seq write, QD8", "MiB/s", "bw_mib_s", "write", "1M", 8),
    FioJob("read-1m-qd8", "1 MiB seq read, QD8", "MiB/s", "bw_mib_s", "read", "1M", 8),
]


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


def run_one(
    job: Job, server: Server, work: Path, content: Path, opts: argparse.Namespace
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{server.name}-", dir=work))
    volume = run_dir / f"{EXPORT}.img"
    try:
        copy_synced(content, volume)
        running = server.start(run_dir, volume, opts.size)
        try:
            result = job.run(running, run_dir, opts)
        except BaseException:
            running.stop()
            print(f"    {server.name} log:\n{tail(running.log_path)}", file=sys.stderr)
            raise
        result |= running.stop()
        return result
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_all(
    jobs: list[Job],
    servers: list[Server],
    work: Path,
    opts: argparse.Namespace,
    runs: list[dict[str, Any]],
) -> None:
    """Append one record per run to runs (kept by the caller, so an error keeps what ran)."""
    content = work / "content.img"
    print(f"bench: writing {opts.size} bytes of random content in {work}", file=sys.stderr)
    make_content(content, opts.size)
    for job in jobs:
        for rep in range(1, opts.reps + 1):
            for server in servers:
                result = run_one(job, server, work, content, opts)
                value = result[job.key]
                print(
                    f"  {job.name:<20} rep {rep}/{opts.reps}  {server.name:<10}"
                    f" {value:>10.0f} {job.unit}",
                    file=sys.stderr,
                )
                runs.append({"job": job.name, "server": server.name, "rep": rep} | result)


# ---------------------------------------------------------------------------------- summary


def values(runs: list[dict[str, Any]], job: Job, server: str, key: str) -> list[float]:
    return [r[key] for r in runs if r["job"] == job.name and r["server"] == server]


def fmt_stat(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.0f} [{min(xs):.0f}-{max(xs):.0f}]"


def summary_lines(runs: list[dict[str, Any]], jobs: list[Job], servers: list[str]) -> list[str]:
    others = [s for s in servers if s != REFERENCE] if REFERENCE in servers else []
    ratio_heads = [f"{s}/{REFERENCE}" for s in others]
    head = f"{'job':<20} {'unit':<6}" + "".join(f" {s:>24}" for s in servers)
    lines = [head + "".join(f" {h:>18}" for h in ratio_heads)]
    for job in jobs:
        row = f"{job.name:<20} {job.unit:<6}"
        row += "".join(f" {fmt_stat(values(runs, job, s, job.key)):>24}" for s in servers)
        ref = values(runs, job, REFERENCE, job.key)
        for s in others:
            mine = values(runs, job, s, job.key)
            ratio = statistics.median(mine) / statistics.median(ref) if mine and ref else None
            row += f" {'-' if ratio is None else f'{ratio:.2f}':>18}"
        lines.append(row)
    lines.append("")
    lines.append(f"{'p99 completion latency, us':<27}" + "".join(f" {s:>24}" for s in servers))
    for job in jobs:
        row = f"{job.name:<27}"
        row += "".join(f" {fmt_stat(values(runs, job, s, 'clat_p99_us')):>24}" for s in servers)
        lines.append(row)
    return lines


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
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(work: Path) -> dict[str, Any]:
    return {
        "fio": tool_version(["fio", "--version"]),
        "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "filesystem": tool_version(["stat", "-f", "-c", "%T", str(work)]),
        "commit": git_commit(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    job_names = [j.name for j in JOBS]
    server_names = [s.name for s in SERVERS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--ramp-time", type=int, default=2, help="fio warm-up seconds (default 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per job+server (default 3)")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="volume size (default 1GiB)")
    p.add_argument(
        "--only",
        action="append",
        choices=job_names,
        metavar="JOB",
        help=f"run only this job (repeatable): {', '.join(job_names)}",
    )
    p.add_argument(
        "--servers",
        default=",".join(server_names),
        help=f"comma-separated subset of: {', '.join(server_names)}",
    )
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
    return opts


def write_results(
    path: Path, opts: argparse.Namespace, env: dict[str, Any], runs: list[dict[str, Any]]
) -> None:
    doc = {"settings": vars(opts), "environment": env, "runs": runs}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    jobs = [j for j in JOBS if not opts.only or j.name in opts.only]
    wanted = opts.servers.split(",")
    servers = [s for s in SERVERS if s.name in wanted]
    runs: list[dict[str, Any]] = []
    RESULTS_DIR.mkdir(exist_ok=True)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=opts.workdir))
    out_path = RESULTS_DIR / time.strftime("bench-%Y%m%d-%H%M%S.json")
    env = environment(work)
    status = 0
    try:
        run_all(jobs, servers, work, opts, runs)
    except (ServerError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        status = 130
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            write_results(out_path, opts, env, runs)
    print()
    print(f"{len(runs)} runs, {opts.runtime}s each (+{opts.ramp_time}s ramp), size {opts.size}")
    print("\n".join(summary_lines(runs, jobs, [s.name for s in servers])))
    print(f"\nraw results: {out_path.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
