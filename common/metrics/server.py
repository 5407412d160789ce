"""GET /metrics over HTTP, on the daemon's event loop (config ``metrics.listen``).

    accept ─► over MAX_CONNECTIONS? ─► closed
        │
        ▼ request line + headers (at most HEAD_BYTES_MAX, within REQUEST_TIMEOUT_S)
    GET|HEAD /metrics ─► choose_encoder(Accept) ─► the registry's exposition (prometheus_client:
                         text 0.0.4 or OpenMetrics, as the scraper asks), gzip if accepted
    anything else     ─► 404 / 405 / 400, one short line
    ─► Connection: close

On the loop, not a thread: a collector reads the groups' live state (dicts the loop changes),
and a scrape costs about a millisecond every scrape interval. One response per connection
keeps it simple; Prometheus opens a new one per scrape when told to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("journalpair.metrics")

__all__ = ["MetricsServer"]

MAX_CONNECTIONS = 16
HEAD_BYTES_MAX = 8 << 10
REQUEST_TIMEOUT_S = 10.0
PATH = "/metrics"


class MetricsServer:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_BYTES_MAX)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        """Stop listening and end the scrapes in progress (a role swap binds again)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._handlers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, headers, body = self._answer(await _read_head(reader))
                writer.write(_response(status, headers, body))
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that went away, or sent too much or too slowly: nothing owed
        finally:
            self._handlers.discard(task)
            writer.close()

    def _answer(self, head: list[str] | None) -> tuple[str, list[tuple[str, str]], bytes]:
        if not head:
            return "400 Bad Request", [], b"bad request\n"
        method, _, rest = head[0].partition(" ")
        target = rest.partition(" ")[0].partition("?")[0]
        if target != PATH:
            return "404 Not Found", [], f"only {PATH} is served here\n".encode()
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [("Allow", "GET, HEAD")], b""
        fields = _header_fields(head[1:])
        encoder, content_type = choose_encoder(fields.get("accept", ""))
        body = encoder(self.registry)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(fields.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6)
            headers.append(("Content-Encoding", "gzip"))
        if method == "HEAD":
            headers.append(("Content-Length", str(len(body))))
            body = b""
        return "200 OK", headers, body


async def _read_head(reader: asyncio.StreamReader) -> list[str] | None:
    """The request line and header lines; None if it is not HTTP/1.x text. The reader's
    limit (HEAD_BYTES_MAX) bounds the head: a longer one raises LimitOverrunError."""
    data = await reader.readuntil(b"\r\n\r\n")
    try:
        lines = data.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    return [line for line in lines if line]


def _header_fields(lines: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    if not any(k == "Content-Length" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii") + body
