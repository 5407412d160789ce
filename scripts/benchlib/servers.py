"""The servers bench.py measures, each serving one volume file as export EXPORT on 127.0.0.1.

    qemu-nbd      qemu-nbd -t --cache=writeback VOLUME             no replication: the reference
    journalpair   primaryd (VOLUME) ◄─READ_JOURNAL── secondaryd (its own S-VOL file)
                  start both ─► link up ─► pairctl create ─► pairctl wait PAIR ─► serve
                  drain(): until display's lag.entries == 0 (the S-VOL has every write)
    qemu-mirror   qemu-storage-daemon (VOLUME, --export type=nbd) ──blockdev-mirror──►
                  qemu-nbd -t (target file): QMP blockdev-add (nbd target node),
                  blockdev-mirror sync=full copy-mode=background ─► query-block-jobs: ready
                  drain(): until the job's offset == len (no dirty data left)
                  Note: a FLUSH makes the source durable, not the target (strace shows
                  fdatasync in qemu-storage-daemon only), and the job's len grows by about
                  64 KiB (its granularity) per 4k write; journalpair's FLUSH covers its journal.

A Server is started once per repetition and serves every job of that repetition; stop()
ends its processes (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and verify() then compares
the replica with the volume byte for byte.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml

from benchlib.qmp import QmpClient, QmpError

ROOT = Path(__file__).resolve().parent.parent.parent
EXPORT = "vol0"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
COPY_TIMEOUT_S = 600.0  # initial copy (journalpair) or mirror to ready
DRAIN_TIMEOUT_S = 600.0
POLL_S = 0.02
CONTROL_TIMEOUT_S = 10.0
CONTROL_ANSWER_BYTES_MAX = 16 << 20
COMPARE_CHUNK_BYTES = 4 << 20
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux
MIRROR_JOB = "mirror0"
# Long enough that stopping the secondary for the backlog job does not suspend the pair.
PATH_WATCH_S = 600


class ServerError(RuntimeError):
    pass


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


def venv_bin(name: str) -> Path:
    here = Path(sys.executable).parent / name
    return here if here.exists() else ROOT / ".venv" / "bin" / name


def socket_path(directory: Path, name: str) -> Path:
    path = directory / name
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    short = Path(tempfile.mkdtemp(prefix="jp-bench-"))  # left behind: an empty directory
    return short / name


def spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop the servers ourselves
        )


def stop_process(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    start = time.monotonic()
    killed = False
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            killed = True
            proc.kill()
            proc.wait()
    return {"stop_s": round(time.monotonic() - start, 3), "killed": killed, "exit": proc.returncode}


def first_difference(a: Path, b: Path) -> int | None:
    """The first byte offset where two files differ (or the shorter one's size); None if equal."""
    with a.open("rb") as fa, b.open("rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(COMPARE_CHUNK_BYTES), fb.read(COMPARE_CHUNK_BYTES)
            if ca != cb:
                return offset + next(
                    (i for i, (x, y) in enumerate(zip(ca, cb, strict=False)) if x != y),
                    min(len(ca), len(cb)),
                )
            if not ca:
                return None
            offset += len(ca)


class Server:
    """One server under test; start() it, run jobs against uri, stop(), verify()."""

    name: ClassVar[str] = "?"
    replicates: ClassVar[bool] = False  # runs the replicated (write) jobs only, with drain()
    by_default: ClassVar[bool] = True  # in --servers when it is not given

    def __init__(self, run_dir: Path, volume: Path, opts: argparse.Namespace) -> None:
        self.run_dir = run_dir
        self.volume = volume
        self.size: int = opts.size
        self.opts = opts
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # label -> process, in start order
        self.logs: dict[str, Path] = {}
        self.setup: dict[str, Any] = {}

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    def start(self) -> None:
        raise NotImplementedError

    def drain(self) -> float | None:
        """Seconds until the replica has every write acknowledged so far; None: no replica."""
        return None

    def status(self) -> dict[str, Any]:
        """What a job records after it ran (e.g. the pair state)."""
        return {}

    def verify(self) -> dict[str, Any]:
        """After stop(): is the replica equal to the volume?"""
        return {}

    def pids(self) -> dict[str, int]:
        return {label: proc.pid for label, proc in self.procs.items()}

    def launch(self, label: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.logs[label] = self.run_dir / f"{label}.log"
        proc = spawn(cmd, self.logs[label])
        self.procs[label] = proc
        return proc

    def stop(self) -> dict[str, Any]:
        return {label: stop_process(p) for label, p in reversed(list(self.procs.items()))}

    def poll_until(self, what: str, done: Callable[[], object], timeout_s: float) -> float:
        """Call done() every POLL_S until it is true; the seconds it took. Stops early, with
        the log, if one of the server's processes exits."""
        start = time.monotonic()
        while not done():
            self.check_alive()
            if time.monotonic() - start > timeout_s:
                raise ServerError(f"{self.name}: {what}: not done after {timeout_s:g} s")
            time.sleep(POLL_S)
        return time.monotonic() - start

    def check_alive(self) -> None:
        for label, proc in self.procs.items():
            if proc.poll() is not None:
                raise ServerError(
                    f"{label} exited with status {proc.returncode}; its log:\n"
                    f"{tail(self.logs[label])}"
                )

    def log_tails(self) -> str:
        return "\n".join(f"--- {label}.log\n{tail(path)}" for label, path in self.logs.items())

    def wait_export(self, uri: str) -> None:
        """Poll with a real NBD client until the export answers with the right size."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            probe = subprocess.run(
                ["nbdinfo", "--size", uri], capture_output=True, text=True, check=False
            )
            if probe.returncode == 0:
                if int(probe.stdout.strip()) != self.size:
                    raise ServerError(f"{uri}: export size {probe.stdout.strip()} != {self.size}")
                return
            last = probe.stderr.strip()
            time.sleep(0.05)
        raise ServerError(f"{uri} not ready after {READY_TIMEOUT_S}s ({last})")


def control_display(path: Path) -> dict[str, Any]:
    """A daemon's `display` result, straight from its control socket: one JSON request line,
    one JSON answer line (common/control.py); {} while nothing listens there. pairctl would
    cost ~0.3 s of Python start-up per poll."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONTROL_TIMEOUT_S)
        try:
            s.connect(str(path))
        except OSError:
            return {}  # not listening yet
        s.sendall(json.dumps({"verb": "display", "args": {}}).encode() + b"\n")
        line = s.makefile("rb").readline(CONTROL_ANSWER_BYTES_MAX)
    answer = json.loads(line)
    if not answer.get("ok"):
        raise ServerError(f"display: {answer.get('error')}")
    result: dict[str, Any] = answer["result"]
    return result


def qemu_nbd_command(volume: Path, port: int) -> list[str]:
    return [
        "qemu-nbd",
        "-f", "raw", "-t", "-x", EXPORT,
        "-p", str(port), "-b", "127.0.0.1",
        "--cache=writeback", "--shared=8",
        str(volume),
    ]  # fmt: skip


class QemuNbd(Server):
    name = "qemu-nbd"

    def start(self) -> None:
        self.launch("qemu-nbd", qemu_nbd_command(self.volume, self.port))
        self.wait_export(self.uri)


class JournalPair(Server):
    name = "journalpair"
    replicates = True

    def __init__(self, run_dir: Path, volume: Path, opts: argparse.Namespace) -> None:
        super().__init__(run_dir, volume, opts)
        self.replica = run_dir / "secondary" / f"{EXPORT}.img"
        repl = f"127.0.0.1:{free_port()}"
        self.controls: dict[str, Path] = {}  # role -> control socket
        s_nbd = f"127.0.0.1:{free_port()}"
        self.configs = {
            "primaryd": self._config("primary", volume, {"nbd": f"127.0.0.1:{self.port}"}, repl),
            "secondaryd": self._config("secondary", self.replica, {"nbd": s_nbd}, repl),
        }

    def _config(self, role: str, volume: Path, listen: dict[str, str], repl: str) -> Path:
        site = self.run_dir / role
        site.mkdir(exist_ok=True)
        control = self.controls[role] = socket_path(site, "ctl.sock")
        config: dict[str, Any] = {"role": role, "group": "bench", "data_dir": str(site / "data")}
        if role == "primary":
            config["listen"] = listen | {"replication": repl}
        else:
            config["listen"] = listen
            config["primary"] = repl
        config |= {
            "control": str(control),
            "journal": {"capacity": self.opts.journal},
            "volumes": [{"name": EXPORT, "path": str(volume), "size": self.size}],
            "pair": {"path_watch_s": PATH_WATCH_S},
        }
        path = site / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> None:
        for daemon in ("primaryd", "secondaryd"):
            self.start_daemon(daemon)
        self.wait_export(self.uri)
        self.poll_until(
            "link up", lambda: self.display().get("link", {}).get("up"), READY_TIMEOUT_S
        )
        start = time.monotonic()
        self.pairctl("create")
        self.pairctl("wait", "PAIR", "--timeout", str(int(COPY_TIMEOUT_S)))
        self.setup["copy_s"] = round(time.monotonic() - start, 3)

    def start_daemon(self, daemon: str) -> None:
        self.launch(daemon, [str(venv_bin(daemon)), "--config", str(self.configs[daemon])])

    def stop_daemon(self, daemon: str) -> dict[str, Any]:
        return stop_process(self.procs.pop(daemon))

    def pairctl(self, *args: str) -> str:
        cmd = [str(venv_bin("pairctl")), "--config", str(self.configs["primaryd"]), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise ServerError(f"pairctl {' '.join(args)}: {out.stderr.strip() or out.stdout}")
        return out.stdout

    def display(self) -> dict[str, Any]:
        return control_display(self.controls["primary"])

    def drain(self) -> float:
        def applied() -> bool:
            return bool(self.display().get("lag", {}).get("entries") == 0)

        return self.poll_until("lag to 0", applied, DRAIN_TIMEOUT_S)

    def status(self) -> dict[str, Any]:
        d = self.display()
        used = d.get("journal", {}).get("used_bytes")
        return {"pair_state": d.get("state"), "journal_used_bytes": used}

    def verify(self) -> dict[str, Any]:
        diff = first_difference(self.volume, self.replica)
        return {"replica_equal": diff is None, "first_difference": diff}


class JournalPairMetrics(JournalPair):
    """journalpair with metrics.listen set on both daemons (NBD requests counted, /metrics
    served): against `journalpair` it measures what the metrics cost."""

    name = "journalpair-metrics"
    by_default = False

    def _config(self, role: str, volume: Path, listen: dict[str, str], repl: str) -> Path:
        path = super()._config(role, volume, listen, repl)
        config = yaml.safe_load(path.read_text())
        config["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


class QemuMirror(Server):
    name = "qemu-mirror"
    replicates = True

    def __init__(self, run_dir: Path, volume: Path, opts: argparse.Namespace) -> None:
        super().__init__(run_dir, volume, opts)
        self.replica = run_dir / "mirror-target.img"
        self.target_port = free_port()
        self.qmp_path = socket_path(run_dir, "qmp.sock")
        self.qmp: QmpClient | None = None

    def qsd_command(self) -> list[str]:
        return [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=source-file,filename={self.volume},"
                          "cache.direct=off",
            "--blockdev", "driver=raw,node-name=source,file=source-file",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}",
            "--export", f"type=nbd,id=export0,node-name=source,name={EXPORT},writable=on",
            "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
        ]  # fmt: skip

    def start(self) -> None:
        with self.replica.open("wb") as f:
            f.truncate(self.size)
        self.launch("mirror-target", qemu_nbd_command(self.replica, self.target_port))
        self.wait_export(f"nbd://127.0.0.1:{self.target_port}/{EXPORT}")
        self.launch("qsd", self.qsd_command())
        self.qmp = QmpClient.connect(self.qmp_path, READY_TIMEOUT_S)
        server = {"type": "inet", "host": "127.0.0.1", "port": str(self.target_port)}
        self.qmp.execute(
            "blockdev-add", driver="nbd", server=server, export=EXPORT, **{"node-name": "target"}
        )
        start = time.monotonic()
        self.qmp.execute(
            "blockdev-mirror",
            device="source",
            target="target",
            sync="full",
            **{"job-id": MIRROR_JOB, "copy-mode": "background"},
        )
        self.poll_until("mirror job ready", lambda: self.job()["ready"], COPY_TIMEOUT_S)
        self.setup["copy_s"] = round(time.monotonic() - start, 3)
        self.wait_export(self.uri)

    def job(self) -> dict[str, Any]:
        assert self.qmp is not None
        for job in self.qmp.execute("query-block-jobs"):
            if job["device"] == MIRROR_JOB:
                if job.get("io-status", "ok") != "ok":
                    raise ServerError(f"mirror job I/O status {job['io-status']}")
                found: dict[str, Any] = job
                return found
        ended = [e for e in self.qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        raise ServerError(f"the mirror job is gone: {ended[-1:] or 'no completion event'}")

    def drain(self) -> float:
        def converged() -> bool:
            job = self.job()
            return bool(job["ready"] and job["offset"] == job["len"] and not job["busy"])

        return self.poll_until("mirror converged", converged, DRAIN_TIMEOUT_S)

    def status(self) -> dict[str, Any]:
        job = self.job()
        return {"mirror_len": job["len"], "mirror_offset": job["offset"]}

    def stop(self) -> dict[str, Any]:
        """block-job-cancel on a ready mirror completes it with the target in sync; then quit."""
        ended: dict[str, Any] = {}
        if self.qmp is not None:
            try:
                self.qmp.execute("block-job-cancel", device=MIRROR_JOB)
                self.poll_until("mirror job ended", self._job_gone, STOP_TIMEOUT_S)
                ended = next(
                    e["data"] for e in self.qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"
                )
            except (QmpError, ServerError, OSError, StopIteration) as e:
                ended = {"error": str(e)}
            finally:
                self.qmp.close()
                self.qmp = None
        return super().stop() | {"mirror_completed": ended}

    def pids(self) -> dict[str, int]:
        """The exporting daemon first, then the target it mirrors to."""
        return dict(sorted(super().pids().items(), key=lambda item: item[0] != "qsd"))

    def _job_gone(self) -> bool:
        assert self.qmp is not None
        return not any(j["device"] == MIRROR_JOB for j in self.qmp.execute("query-block-jobs"))

    def verify(self) -> dict[str, Any]:
        diff = first_difference(self.volume, self.replica)
        return {"replica_equal": diff is None, "first_difference": diff}


SERVERS: list[type[Server]] = [JournalPair, QemuNbd, QemuMirror, JournalPairMetrics]
