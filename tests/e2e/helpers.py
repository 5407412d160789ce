"""End-to-end harness: real primaryd/secondaryd processes and real NBD clients.

    Daemons(tmp_path).start_primary(volumes)          (or start_secondary: read-only exports)
        write <name>.yaml with free 127.0.0.1 ports ── Popen(<venv>/bin/primaryd --config ..)
        │   stderr ──► <name>.log
        └─ poll until the NBD port accepts a TCP connection
           (the process exited or the deadline passed: fail with the log tail)
    Daemons.stop_all()  (fixture teardown)
        SIGTERM every daemon still running ── wait (bounded) ── exit code must be 0

Every client runs through run(), which always passes a timeout, and a failure message carries
the command line, the exit code and the client's output. The conftest hook appends the daemon
logs to the report of any failing test.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from common import control
from common.pairctl import DISPLAY_TIMEOUT_S
from tests.e2e.faultproxy import FaultProxy

KiB = 1 << 10
MiB = 1 << 20
HOST = "127.0.0.1"
# The console scripts sit next to the interpreter running pytest (.venv/bin).
DAEMON_BIN_DIR = Path(sys.executable).parent
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 60


# Ports for daemons come from a range of this worker's own (pytest-xdist runs tests in
# several processes), below the kernel's ephemeral range (32768-60999 on Linux): a port the
# kernel handed to bind(0) in one worker could be handed to another worker before the daemon
# binds it, and an outgoing connection never takes one of these.
PORTS_PER_WORKER = 2000
_PORT_BASE = 20000 + PORTS_PER_WORKER * int(
    os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0
)
_next_port = itertools.count(random.randrange(PORTS_PER_WORKER))


def free_port() -> int:
    """A port of this worker's range that is free now (bound and closed to check)."""
    for _ in range(PORTS_PER_WORKER):
        port = _PORT_BASE + next(_next_port) % PORTS_PER_WORKER
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {_PORT_BASE}..{_PORT_BASE + PORTS_PER_WORKER - 1}")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def unix_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
        return True


def tcp_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# --- clients -----------------------------------------------------------------------------------


def format_result(cmd: Sequence[str], rc: int | None, out: str, err: str) -> str:
    return (
        f"command: {' '.join(map(str, cmd))}\nexit code: {rc}\n"
        f"--- stdout ---\n{out[-8000:]}\n--- stderr ---\n{err[-8000:]}"
    )


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = CLIENT_TIMEOUT_S,
    check: bool = True,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client to completion (bounded); with ``check`` a non-zero exit fails the test."""
    argv = [os.fspath(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise AssertionError(
            f"client hung: no exit after {timeout} s\n" + format_result(argv, None, out, err)
        ) from None
    if check and proc.returncode != 0:
        raise AssertionError(
            "client failed\n" + format_result(argv, proc.returncode, proc.stdout, proc.stderr)
        )
    return proc


def qemu_io(
    uri: str,
    *commands: str,
    check: bool = True,
    read_only: bool = False,
    timeout: float = CLIENT_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """qemu-io on an NBD URI, one ``-c`` per command; qemu-io exits 1 when a command fails."""
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        argv += ["-c", command]
    argv.append(uri)
    return run(argv, check=check, timeout=timeout)


# --- files ------------------------------------------------------------------------------------


def sha256_file(path: Path, length: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = length if length is not None else -1
    with open(path, "rb") as file:
        while remaining != 0:
            chunk = file.read(4 * MiB if remaining < 0 else min(4 * MiB, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
    return digest.hexdigest()


def volumes_equal(one: Daemon, other: Daemon) -> bool:
    """Every volume of `one` holds the same bytes at `other` (sha256 of the files)."""
    return all(
        sha256_file(volume.path) == sha256_file(other.volume(name).path)
        for name, volume in one.volumes.items()
    )


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def make_sparse_image(
    path: Path, size: int, extents: Iterable[tuple[int, int]], seed: int
) -> list[tuple[int, int]]:
    """A sparse raw file of ``size`` with random bytes at each (offset, length), holes between."""
    rng = random.Random(seed)
    written = []
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, length in extents:
            file.seek(offset)
            file.write(rng.randbytes(length))
            written.append((offset, length))
    return written


# --- daemons ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    name: str
    size: int
    path: Path


@dataclass
class Daemon:
    """One primaryd/secondaryd process with its config, log and ports."""

    name: str
    role: str
    config_path: Path
    log_path: Path
    nbd_port: int
    volumes: dict[str, Volume]
    peer_port: int = 0  # primary: its replication port; secondary: the primary's
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)
    returncode: int | None = None
    reaped: bool = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def uri(self, volume: str = "vol0") -> str:
        return f"nbd://{HOST}:{self.nbd_port}/{volume}"

    @property
    def base_uri(self) -> str:
        return f"nbd://{HOST}:{self.nbd_port}"

    def volume(self, name: str = "vol0") -> Volume:
        return self.volumes[name]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.name} log tail ({self.log_path}) ---\n" + "\n".join(tail)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        exe = DAEMON_BIN_DIR / f"{self.role}d"
        self.returncode, self.reaped = None, False
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in _reap)
        self.proc = subprocess.Popen(
            [os.fspath(exe), "--config", os.fspath(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=self.log_file,
        )
        deadline = time.monotonic() + timeout_s
        while not tcp_accepts(self.nbd_port):
            if self.proc.poll() is not None:
                self._reap()
                raise AssertionError(
                    f"{self.name} exited with code {self.returncode} before its NBD port "
                    f"{self.nbd_port} accepted a connection\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"{self.name}: NBD port {self.nbd_port} not accepting after {timeout_s} s\n"
                    + self.log_tail()
                )
            time.sleep(0.02)
        # The control socket opens just after the NBD port: pairctl and display() need it.
        while not unix_accepts(self.control_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                self._reap()
                raise AssertionError(
                    f"{self.name}: control socket {self.control_path} not accepting\n"
                    + self.log_tail()
                )
            time.sleep(0.02)

    @property
    def control_path(self) -> Path:
        """``control`` of its config (a test may rewrite the config between starts)."""
        return Path(yaml.safe_load(self.config_path.read_text())["control"])

    def terminate(self) -> None:
        """Send SIGTERM (the graceful stop) without waiting."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait (bounded) for the process to exit; a daemon that does not is killed."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running {timeout_s} s after SIGTERM; "
                f"killed it\n{self.log_tail()}"
            ) from None
        self._reap()
        assert self.returncode is not None
        return self.returncode

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait (bounded), and require exit code 0."""
        if self.proc is None:
            return
        self.terminate()
        code = self.wait(timeout_s)
        assert code == 0, f"{self.name} exited with code {code} after SIGTERM\n{self.log_tail()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.returncode = self.proc.poll()
            self.reaped = self.returncode is not None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


def config_text(
    *,
    role: str,
    data_dir: Path,
    nbd_port: int,
    peer_port: int,
    control: Path,
    volumes: Iterable[Volume],
    journal_capacity: str = "64MiB",
    pair: Mapping[str, Any] | None = None,
    link: Mapping[str, Any] | None = None,
    nbd: Mapping[str, Any] | None = None,
    log: Mapping[str, Any] | None = None,
) -> str:
    """A config in the ARCHITECTURE.md contract; ``peer_port`` is replication or primary.

    ``pair``, ``link``, ``nbd`` and ``log`` become the optional sections, written as JSON
    mappings (JSON is YAML)."""
    lines = [
        f"role: {role}",
        "group: jg0",
        f"data_dir: {data_dir}",
        "listen:",
        f"  nbd: {HOST}:{nbd_port}",
    ]
    if role == "primary":
        lines.append(f"  replication: {HOST}:{peer_port}")
    else:
        lines.append(f"primary: {HOST}:{peer_port}")
    lines += [f"control: {control}", "journal:", f"  capacity: {journal_capacity}", "volumes:"]
    lines += [f"  - {{name: {v.name}, path: {v.path}, size: {v.size}}}" for v in volumes]
    if pair is not None:
        lines.append(f"pair: {json.dumps(dict(pair))}")
    if link is not None:
        lines.append(f"link: {json.dumps(dict(link))}")
    if nbd is not None:
        lines.append(f"nbd: {json.dumps(dict(nbd))}")
    if log is not None:
        lines.append(f"log: {json.dumps(dict(log))}")
    return "\n".join(lines) + "\n"


class Daemons:
    """Starts daemons in ``tmp_path`` and, at teardown, stops them and checks their exit."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Daemon] = []

    def prepare(
        self,
        role: str = "primary",
        volumes: Sequence[tuple[str, int]] = (("vol0", 64 * MiB),),
        name: str | None = None,
        primary_port: int | None = None,
        pair: Mapping[str, Any] | None = None,
        link: Mapping[str, Any] | None = None,
        nbd: Mapping[str, Any] | None = None,
        log: Mapping[str, Any] | None = None,
    ) -> Daemon:
        """Write the config (fresh ports, paths under tmp_path) without starting anything."""
        name = name or f"{role}{sum(d.role == role for d in self.started) or ''}"
        site = self.tmp_path / name
        site.mkdir(parents=True, exist_ok=True)
        vols = {vol: Volume(vol, size, site / f"{vol}.img") for vol, size in volumes}
        nbd_port = free_port()
        peer_port = primary_port if primary_port is not None else free_port()
        config_path = site / f"{name}.yaml"
        config_path.write_text(
            config_text(
                role=role,
                data_dir=site / "data",
                nbd_port=nbd_port,
                peer_port=peer_port,
                control=site / f"{role}.sock",
                volumes=vols.values(),
                pair=pair,
                link=link,
                nbd=nbd,
                log=log,
            )
        )
        daemon = Daemon(name, role, config_path, site / f"{name}.log", nbd_port, vols, peer_port)
        self.started.append(daemon)
        return daemon

    def start_primary(
        self, volumes: Sequence[tuple[str, int]] = (("vol0", 64 * MiB),), name: str | None = None
    ) -> Daemon:
        daemon = self.prepare("primary", volumes, name)
        daemon.start()
        return daemon

    def start_secondary(
        self,
        volumes: Sequence[tuple[str, int]] = (("vol0", 64 * MiB),),
        name: str | None = None,
        fill: Callable[[Volume], None] | None = None,
    ) -> Daemon:
        """A secondary whose primary address has nobody listening: it serves read-only."""
        daemon = self.prepare("secondary", volumes, name)
        if fill is not None:
            for volume in daemon.volumes.values():
                fill(volume)
        daemon.start()
        return daemon

    def start_pair(
        self, volumes: Sequence[tuple[str, int]] = (("vol0", 64 * MiB),)
    ) -> tuple[Daemon, Daemon]:
        """A primary and a secondary pulling from it, both started, not yet paired."""
        primary = self.start_primary(volumes)
        secondary = self.prepare("secondary", volumes, primary_port=primary.peer_port)
        secondary.start()
        wait_until(
            lambda: display(primary)["link"]["up"], timeout_s=15, what="the secondary to connect"
        )
        return primary, secondary

    def stop_all(self) -> None:
        """Stop every daemon (reverse order); raise one error naming all that misbehaved."""
        problems = []
        for daemon in reversed(self.started):
            if daemon.proc is None or daemon.reaped:
                continue  # never started, or the test stopped it and checked the exit code
            if daemon.proc.poll() is not None:
                daemon._reap()
                problems.append(
                    f"{daemon.name} exited during the test with code {daemon.returncode}\n"
                    + daemon.log_tail()
                )
                continue
            try:
                daemon.stop()
            except AssertionError as exc:
                problems.append(str(exc))
        if problems:
            raise AssertionError("\n\n".join(problems))


def run_daemon_to_exit(
    role: str, config_path: Path, timeout_s: float = START_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to refuse its config and exit by itself."""
    argv = [os.fspath(DAEMON_BIN_DIR / f"{role}d"), "--config", os.fspath(config_path)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(
            f"{role}d kept running with a bad config ({timeout_s} s)\n"
            + format_result(argv, proc.returncode, out, err)
        ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# --- libnbd -----------------------------------------------------------------------------------


def wait_command(handle: Any, cookie: int, timeout_s: float = 10.0) -> bool:
    """Drive a libnbd handle until command ``cookie`` completes; never hang.

    Returns True when it succeeded; raises nbd.Error when it failed (errno set) or the
    connection died under it, AssertionError when nothing happened within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while not handle.aio_command_completed(cookie):
        if time.monotonic() > deadline:
            raise AssertionError(f"NBD command {cookie} did not complete in {timeout_s} s (hang)")
        handle.poll(100)
    return True


def errno_name(code: int | None) -> str:
    if code is None:
        return "None"
    return errno.errorcode.get(code, str(code))


def nbd_errno(error: BaseException) -> int | None:
    """The errno of an nbd.Error as a number (libnbd 1.14 gives its name, e.g. "EINVAL")."""
    code = getattr(error, "errno", None)
    if isinstance(code, str):
        number = getattr(errno, code, None)
        return number if isinstance(number, int) else None
    return code if isinstance(code, int) else None


def close_handle(handle: Any) -> None:
    """Disconnect a libnbd handle (NBD_CMD_DISC); the bindings close the socket on __del__."""
    with contextlib.suppress(Exception):
        handle.shutdown()
    close = getattr(handle, "close", None)  # newer bindings have an explicit close
    if close is not None:
        with contextlib.suppress(Exception):
            close()


# --- pairctl ------------------------------------------------------------------------------------


def pairctl(
    daemon: Daemon, *args: str, check: bool = True, timeout: float = CLIENT_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return run(
        [DAEMON_BIN_DIR / "pairctl", "--config", daemon.config_path, *args],
        check=check,
        timeout=timeout,
    )


def display(daemon: Daemon) -> dict[str, Any]:
    """What `pairctl display --json` prints, asked over the control socket from this process.

    Tests poll this in loops; a pairctl process per poll cost ~0.25 s of CPU, a third of the
    suite's. It is the same call pairctl makes (tests of pairctl itself run the command).
    A daemon that does not answer fails like a failed pairctl: AssertionError.
    """
    try:
        result = asyncio.run(control.call(daemon.control_path, "display", {}, DISPLAY_TIMEOUT_S))
    except (control.ControlError, control.ControlRefused) as exc:
        raise AssertionError(f"display of {daemon.name} failed: {exc}") from None
    shown = json.loads(json.dumps(result, sort_keys=True))  # exactly what --json would print
    assert isinstance(shown, dict)
    return shown


def wait_state(daemon: Daemon, state: str, timeout_s: float = 60.0) -> None:
    """Until the daemon reports ``state`` (what `pairctl wait STATE` does, without a process
    per call: test_pair_copy.py runs the command itself)."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        with contextlib.suppress(AssertionError):  # restarting: no control socket for a moment
            last.update(display(daemon))
        return last.get("state") == state

    try:
        wait_until(reached, timeout_s, f"{daemon.name} to reach {state}", interval_s=0.1)
    except AssertionError:
        raise AssertionError(
            f"{daemon.name} did not reach {state} in {timeout_s} s: it is "
            f"{last.get('state', 'not answering')} ({last.get('reason', '')})\n" + daemon.log_tail()
        ) from None


def wait_caught_up(primary: Daemon, timeout_s: float = 60.0) -> dict[str, Any]:
    """Until the primary reports lag 0 (the secondary applied everything journaled)."""

    def caught_up() -> dict[str, Any] | None:
        shown = display(primary)
        return shown if shown["lag"]["entries"] == 0 and shown["state"] == "PAIR" else None

    return wait_until(caught_up, timeout_s, "lag 0 in PAIR", interval_s=0.1)


def create_pair(primary: Daemon, secondary: Daemon, timeout_s: float = 60.0) -> None:
    pairctl(primary, "create")
    wait_state(primary, "PAIR", timeout_s)
    wait_state(secondary, "PAIR", timeout_s)


def events(daemon: Daemon) -> list[dict[str, Any]]:
    """Every event the daemon recorded (transitions and notices), from `pairctl events`."""
    return [json.loads(line) for line in pairctl(daemon, "events").stdout.splitlines()]


def transitions(daemon: Daemon) -> list[tuple[str, str]]:
    """Every (old, new) state the daemon went through, from `pairctl events`."""
    return [(e["old"], e["new"]) for e in events(daemon) if e.get("kind") == "transition"]


def pair_through_proxy(
    daemons: Daemons,
    proxies: list[FaultProxy],
    volumes: Sequence[tuple[str, int]] = (("vol0", 64 * MiB),),
    *,
    pair: Mapping[str, Any],
    create: bool = True,
    log: Mapping[str, Any] | None = None,
) -> tuple[Daemon, Daemon, FaultProxy]:
    """A primary, and a secondary that pulls through a FaultProxy (added to ``proxies``):

    secondaryd ──► proxy ──► primaryd's replication port       paired unless not ``create``
    """
    primary = daemons.prepare("primary", volumes, pair=pair, log=log)
    primary.start()
    proxy = FaultProxy(HOST, primary.peer_port).start()
    proxies.append(proxy)
    secondary = daemons.prepare("secondary", volumes, primary_port=proxy.port, pair=pair, log=log)
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    if create:
        create_pair(primary, secondary)
    return primary, secondary, proxy
