"""A small synchronous QMP client: JSON lines over a Unix socket, one command at a time.

connect(path) ──► greeting {"QMP": {...}}
{"execute": "qmp_capabilities"} ──► {"return": {}}        (command mode from here on)
{"execute": CMD, "arguments": {...}} ──► {"return": ...} | {"error": {class, desc}}
any time: {"event": NAME, "data": {...}, "timestamp": ...}  (kept in .events, skipped)
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

ANSWER_BYTES_MAX = 1 << 20
EVENTS_MAX = 1000


class QmpError(RuntimeError):
    pass


class QmpClient:
    def __init__(self, path: Path, sock: socket.socket) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.sock = sock
        self.file = sock.makefile("rwb")

    @classmethod
    def connect(cls, path: Path, timeout_s: float = 30.0) -> QmpClient:
        """Connect (retrying until the server listens or timeout_s), negotiate, return."""
        deadline = time.monotonic() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"connect to QMP at {path}: {e}") from e
                time.sleep(0.05)
        client = cls(path, sock)
        greeting = client._read()
        if "QMP" not in greeting:
            client.close()
            raise QmpError(f"QMP at {path}: unexpected greeting {greeting}")
        client.execute("qmp_capabilities")
        return client

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its "return" value, or QmpError with QEMU's error description."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            message = self._read()
            if "event" in message:
                self.events = [*self.events[-(EVENTS_MAX - 1) :], message]
                continue
            if "error" in message:
                error = message["error"]
                raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
            if "return" in message:
                return message["return"]
            raise QmpError(f"{command}: unexpected answer {message}")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline(ANSWER_BYTES_MAX)
        if not line:
            raise QmpError(f"QMP at {self.path} closed the connection")
        if not line.endswith(b"\n"):
            raise QmpError(f"QMP at {self.path}: answer over {ANSWER_BYTES_MAX} bytes")
        message: dict[str, Any] = json.loads(line)
        return message

    def close(self) -> None:
        self.file.close()
        self.sock.close()
