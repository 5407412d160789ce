"""What bench.py runs against a started server, and what one run records.

FioJob.run(server)
  reset each server process's peak RSS (clear_refs)
  fio --ioengine=nbd ... &  ──► after --ramp-time: CPU window opens (utime+stime per process)
  fio exits                 ──► CPU "during fio"
  server.drain()            ──► the replica has every write: CPU window closes
  requests = every NBD request fio completed after the ramp (reads + writes + flushes)
  CPU per request = CPU window / requests; peak RSS = VmHWM of each process

BacklogJob.run(journalpair)   (issue 5 part 6: memory with 1 GiB of journal backlog)
  stop secondaryd ─► fio writes --backlog bytes (1 MiB, QD8) ─► the primary holds them all
  start secondaryd ─► drain: catch-up time; peaks of both daemons over the whole job
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.procs import Usage
from benchlib.servers import JournalPair, Server

FIO_SLACK_S = 120  # fio's start-up and tear-down, beyond its run time
DIRECTIONS = ("read", "write", "trim", "sync")


class JobError(RuntimeError):
    pass


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    unit: str  # how the summary labels the value of key
    key: str  # the result field the summary reports: "iops", "bw_mib_s", ...

    @property
    def writes(self) -> bool:
        """Whether the job writes (so a replica has something to catch up with)."""
        return True

    def runs_on(self, server: type[Server]) -> bool:
        return True

    def run(self, server: Server, opts: argparse.Namespace) -> dict[str, Any]:
        raise NotImplementedError


def run_fio(cmd: list[str], output: Path, timeout_s: float, usage: Usage, ramp_s: float) -> Any:
    """Run fio; open usage's CPU window once the ramp time is over; fio's job report."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=ramp_s)
    usage.mark_cpu()
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0 or not output.exists():
        raise JobError(f"fio failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    report = json.loads(output.read_text())
    job = report["jobs"][0]
    if job.get("error"):
        raise JobError(f"fio job error {job['error']}: {stderr.strip()[-2000:]}")
    return report


def requests_done(fio_job: dict[str, Any]) -> int:
    return sum(int(fio_job[d]["total_ios"]) for d in DIRECTIONS if d in fio_job)


def per_request_us(cpu_s: dict[str, float], requests: int) -> dict[str, float]:
    return {name: s * 1e6 / requests if requests else 0.0 for name, s in cpu_s.items()}


def side_metrics(side: dict[str, Any]) -> dict[str, Any]:
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


@dataclass(frozen=True)
class FioJob(Job):
    rw: str = "randread"
    bs: str = "4k"
    iodepth: int = 1
    fsync: int = 0  # fio --fsync=N: a flush (NBD_CMD_FLUSH with ioengine=nbd) every N writes

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"

    @property
    def writes(self) -> bool:
        return self.direction == "write"

    def runs_on(self, server: type[Server]) -> bool:
        """Replicating peers other than journalpair are there to compare writes."""
        return self.direction == "write" or not server.replicates or issubclass(server, JournalPair)

    def fio_command(self, uri: str, output: Path, opts: argparse.Namespace) -> list[str]:
        cmd = [
            "fio",
            f"--name={self.name}",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={self.rw}",
            f"--bs={self.bs}",
            f"--iodepth={self.iodepth}",
            "--time_based",
            f"--runtime={opts.runtime}",
            f"--ramp_time={opts.ramp_time}",
            "--output-format=json",
            f"--output={output}",
        ]
        return cmd + ([f"--fsync={self.fsync}"] if self.fsync else [])

    def run(self, server: Server, opts: argparse.Namespace) -> dict[str, Any]:
        output = server.run_dir / f"fio-{self.name}.json"
        usage = Usage(server.pids())
        usage.start()
        cmd = self.fio_command(server.uri, output, opts)
        timeout_s = opts.runtime + opts.ramp_time + FIO_SLACK_S
        report = run_fio(cmd, output, timeout_s, usage, opts.ramp_time)
        cpu_fio = usage.cpu_since_start()
        drain_s = server.drain()
        cpu = usage.cpu_since_start()
        job = report["jobs"][0]
        requests = requests_done(job)
        flushes = int(job.get("sync", {}).get("total_ios", 0))
        writes = int(job["write"]["total_ios"])
        if self.fsync and flushes < writes // self.fsync - self.iodepth:
            raise JobError(f"{self.name}: fio sent {flushes} flushes for {writes} writes")
        return (
            side_metrics(job[self.direction])
            | {
                "requests": requests,
                "flushes": flushes,
                "drain_s": drain_s,
                "cpu_s": cpu,
                "cpu_s_during_fio": cpu_fio,
                "cpu_us_per_req": per_request_us(cpu, requests),
                "rss_peak_mib": usage.peak_rss_mib(),
                "rss_peak_reset": usage.peak_reset,
            }
            | server.status()
            | {"fio": report}
        )


@dataclass(frozen=True)
class BacklogJob(Job):
    """Peak RSS of both daemons with opts.backlog bytes of journal waiting for a stopped
    secondary, and the secondary's catch-up once it is back."""

    def runs_on(self, server: type[Server]) -> bool:
        return server is JournalPair

    def run(self, server: Server, opts: argparse.Namespace) -> dict[str, Any]:
        if not isinstance(server, JournalPair):
            raise JobError(f"{self.name} runs on journalpair only")
        stopped = server.stop_daemon("secondaryd")
        primary = Usage(server.pids())
        primary.start()
        output = server.run_dir / f"fio-{self.name}.json"
        cmd = [
            "fio", f"--name={self.name}", "--ioengine=nbd", f"--uri={server.uri}",
            "--rw=write", "--bs=1M", "--iodepth=8", f"--io_size={opts.backlog}",
            "--output-format=json", f"--output={output}",
        ]  # fmt: skip
        report = run_fio(cmd, output, opts.backlog / (1 << 20) + FIO_SLACK_S, primary, 0)
        held = server.display()
        server.start_daemon("secondaryd")
        secondary = Usage({"secondaryd": server.procs["secondaryd"].pid})
        secondary.start()
        catch_up_s = server.drain()
        cpu = primary.cpu_since_start() | secondary.cpu_since_start()
        requests = requests_done(report["jobs"][0])
        return (
            side_metrics(report["jobs"][0]["write"])
            | {
                "requests": requests,
                "backlog_entries": held["lag"]["entries"],
                "backlog_bytes": held["lag"]["bytes"],
                "journal_used_bytes_backlog": held["journal"]["used_bytes"],
                "drain_s": catch_up_s,
                "cpu_s": cpu,
                "cpu_us_per_req": per_request_us(cpu, requests),
                "rss_peak_mib": primary.peak_rss_mib() | secondary.peak_rss_mib(),
                "rss_peak_reset": primary.peak_reset,
                "secondary_stop": stopped,
                "link_up_while_stopped": held.get("link", {}).get("up"),
            }
            | server.status()
            | {"fio": report}
        )
