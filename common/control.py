"""The control API: one JSON request line in, JSON answer lines out, over a Unix socket.

    client (pairctl)                               ControlServer (inside a daemon)
      connect(path) ─────────────────────────────► accept: one task per connection, tracked
      {"verb": "split", "args": {"rw": false}}\\n ─► read one line (<= 64 KiB, 10 s)
                                                     │ bad JSON / too long / too slow: error, close
                                                     ├ plain verb:  await handler(args)
      ◄── {"ok": true, "result": {...}}\\n ────────  │   ControlRefused: {"ok": false, "error":
      ◄── {"ok": false, "error": ..., "exit_code"}   │   reason, "exit_code": n}; a crash: logged
          close                                      │   with its traceback, exit_code 70
                                                     └ streaming verb: async for event in
      ◄── {"ok": true, "event": {...}}\\n  ...          stream(args), one line each, until the
          (client closes when it has seen enough)      stream ends, the client closes, or stop()

The wire is deliberately plain: `socat - UNIX-CONNECT:ctl.sock` is a usable client. Errors are
one line; their `exit_code` is what pairctl exits with, so a daemon decides how a refusal reads
to a script (1 refused, 2 bad request, 70 daemon bug, 75 try again later).

The socket file is born 0o600 (owner read-write, nobody else anything): the socket's own
mode is set before bind(), and Linux creates the file with that mode minus the umask, so there
is no moment at which it exists with a wider mode; it is checked after bind and listened on only
then. There is no TCP control listener: the Unix socket's file mode is the access control.
A socket file left by a killed daemon (nothing answers) is removed on start; one that answers
means a second daemon with the same config, which is refused.

The server has start()/stop() rather than one serve() coroutine because the daemons own its
lifetime next to their other listeners; the connection tasks it creates are kept in a set,
bounded (CONNECTIONS_MAX) and cancelled and awaited by stop(), so none outlives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from common.pairstate import Refused

__all__ = [
    "CONNECTIONS_MAX",
    "EXIT_BAD_REQUEST",
    "EXIT_INTERNAL",
    "EXIT_REFUSED",
    "EXIT_TRY_AGAIN",
    "REQUEST_BYTES_MAX",
    "REQUEST_TIMEOUT_S",
    "ControlError",
    "ControlRefused",
    "ControlServer",
    "Handler",
    "StreamHandler",
    "call",
    "private_unix_socket",
    "stream",
]

log = logging.getLogger("journalpair.control")

REQUEST_BYTES_MAX = 64 << 10  # one request line, without its newline
REQUEST_TIMEOUT_S = 10.0  # a client has this long to send its request line
REPLY_TIMEOUT_S = 10.0  # a plain answer must be taken by the client within this
ANSWER_BYTES_MAX = 16 << 20  # client side: one answer line (display, 1000 events of history)
CONNECT_TIMEOUT_S = 10.0
CONNECTIONS_MAX = 64  # concurrent control connections per daemon (watchers and followers)
_PROBE_TIMEOUT_S = 1.0  # start(): how long an existing socket gets to answer
SOCKET_MODE = 0o600  # the control socket file: its owner only, who may do everything

EXIT_REFUSED = 1
EXIT_BAD_REQUEST = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in the daemon
EXIT_TRY_AGAIN = 75  # EX_TEMPFAIL

Handler = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]
StreamHandler = Callable[[Mapping[str, Any]], AsyncIterator[Mapping[str, Any]]]

_NOTHING: Mapping[str, Any] = MappingProxyType({})


class ControlRefused(Exception):
    """An operation refused, with the one-line reason and the exit status pairctl reports.

    Handlers raise it ("cannot resync: pair is PAIR"); `call` raises it when the daemon refused.
    """

    def __init__(self, reason: str, exit_code: int = EXIT_REFUSED) -> None:
        self.reason = _one_line(reason)
        self.exit_code = exit_code
        super().__init__(self.reason)


class ControlError(Exception):
    """The control exchange itself failed: socket in use, daemon unreachable, garbled answer."""


class _BadRequest(Exception):
    """The client broke the wire protocol; str() is the reason sent back before closing."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _json_default(value: object) -> object:
    # Handlers may hand back Paths (volumes[].path); anything else is a handler bug.
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _encode(message: Mapping[str, Any]) -> bytes:
    text = json.dumps(message, separators=(",", ":"), allow_nan=False, default=_json_default)
    return text.encode() + b"\n"


def _error(reason: str, exit_code: int) -> bytes:
    return _encode({"ok": False, "error": _one_line(reason), "exit_code": exit_code})


# --- server ---------------------------------------------------------------------------------


def private_unix_socket() -> socket.socket:
    """A Unix stream socket whose bind() creates its file with mode SOCKET_MODE (less the umask).

    Linux gives the new file the socket inode's mode minus the umask (af_unix.c,
    unix_bind_bsd), so an fchmod before bind leaves no moment at which the file is wider.
    A umask around bind would do the same for every thread of the daemon (an executor
    creating a journal segment, a hook being spawned); a private directory and a rename
    would need a temporary name longer than the configured path (sun_path holds 107 bytes)
    and would replace, not refuse, a socket another daemon bound in the meantime.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)
    except OSError:
        sock.close()
        raise
    return sock


class ControlServer:
    """Serves `handlers` (plain verbs) and `streams` (streaming verbs) on the socket `path`.

    A verb may have both (`events`): the request streams when its args hold "follow": true,
    the `tail -f` convention, and gets one answer otherwise.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        streams: Mapping[str, StreamHandler] = _NOTHING,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self._handlers = dict(handlers)
        self._streams = dict(streams)
        self._request_timeout_s = request_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Listen on the socket; ControlError if another daemon is there or it cannot be made."""
        if self._server is not None:
            raise RuntimeError("control server already started")
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        await self._remove_stale_socket()
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, sock=sock, limit=REQUEST_BYTES_MAX
            )
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        log.info("control socket listening on %s", self.path)

    def _bind(self) -> socket.socket:
        try:
            sock = private_unix_socket()
            try:
                sock.bind(os.fspath(self.path))
                st = os.stat(self.path)
                self._inode = (st.st_dev, st.st_ino)
                if stat.S_IMODE(st.st_mode) & ~SOCKET_MODE:  # a kernel that ignored the fchmod
                    self._unlink_own_socket()
                    raise ControlError(
                        f"cannot listen on {self.path}: it was created with mode "
                        f"{stat.S_IMODE(st.st_mode):04o}, not {SOCKET_MODE:04o}"
                    )
                # A umask may have taken the owner's bits too: the owner is refused nothing.
                os.chmod(self.path, SOCKET_MODE)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        return sock

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                _reader, writer = await asyncio.open_unix_connection(os.fspath(self.path))
        except ConnectionRefusedError:
            log.info("removing stale control socket %s (nothing listens on it)", self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        except FileNotFoundError:
            return  # removed meanwhile
        except TimeoutError:
            pass  # connect hangs: a listener with a full backlog is still a listener
        except OSError as exc:
            raise ControlError(f"cannot check {self.path}: {exc.strerror or exc}") from exc
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        raise ControlError(f"another daemon is already listening on {self.path}")

    async def stop(self) -> None:
        """Stop listening, cancel every connection (and the handlers it runs), remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        self._unlink_own_socket()
        log.info("control socket %s closed", self.path)

    def _unlink_own_socket(self) -> None:
        # Only our socket: a successor daemon may already have replaced it with its own.
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot remove control socket %s: %s", self.path, exc.strerror)
        self._inode = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if len(self._tasks) > CONNECTIONS_MAX:
                reason = f"too many control connections (max {CONNECTIONS_MAX}); try again"
                await self._reply(writer, _error(reason, EXIT_TRY_AGAIN))
                return
            try:
                verb, args = await self._read_request(reader)
            except _BadRequest as exc:
                log.info("control: bad request: %s", exc)
                await self._reply(writer, _error(f"bad request: {exc}", EXIT_BAD_REQUEST))
                return
            if self._streams_for(verb, args):
                await self._serve_stream(verb, args, reader, writer)
            else:
                await self._reply(writer, await self._answer(verb, args))
        except (ConnectionError, TimeoutError) as exc:
            log.debug("control client gone: %r", exc)
        except Exception:  # our own bug; the daemon and the other clients carry on
            log.error("control: connection failed", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _streams_for(self, verb: str, args: Mapping[str, Any]) -> bool:
        # A verb with both kinds of handler (events) streams when asked to follow.
        if verb not in self._streams:
            return False
        return verb not in self._handlers or args.get("follow") is True

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, Any]]:
        try:
            async with asyncio.timeout(self._request_timeout_s):
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            raise _BadRequest(f"no request line within {self._request_timeout_s:g} s") from None
        except asyncio.LimitOverrunError:
            raise _BadRequest(f"request line longer than {REQUEST_BYTES_MAX} bytes") from None
        except asyncio.IncompleteReadError as exc:
            line = exc.partial  # the client half-closed after its request: fine, if complete
            if not line.strip():
                raise _BadRequest("no request line before end of stream") from None
        return _parse_request(line)

    async def _answer(self, verb: str, args: Mapping[str, Any]) -> bytes:
        handler = self._handlers.get(verb)
        if handler is None:
            return _error(f"unknown verb {verb}", EXIT_BAD_REQUEST)
        log.debug("control: %s %s", verb, args)
        try:
            result = await handler(args)
            return _encode({"ok": True, "result": result})
        except ControlRefused as exc:
            log.info("control: %s refused: %s", verb, exc.reason)
            return _error(exc.reason, exc.exit_code)
        except Refused as exc:  # the pair state table says no: "cannot resync: pair is PAIR"
            log.info("control: %s refused: %s", verb, exc.reason)
            return _error(exc.reason, EXIT_REFUSED)
        except Exception as exc:
            log.error("control: %s failed", verb, exc_info=True)
            return _error(_internal(exc), EXIT_INTERNAL)

    async def _reply(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        writer.write(line)
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            await writer.drain()

    async def _serve_stream(
        self,
        verb: str,
        args: Mapping[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Pump events until the stream ends or the client closes, whichever comes first.

        Without watching the reader, a client that left would only be noticed at the next
        event, which may be hours away on a quiet pair.
        """
        log.debug("control: streaming %s %s", verb, args)
        try:
            events = self._streams[verb](args)
        except ControlRefused as exc:  # a plain function that refuses before streaming
            log.info("control: %s refused: %s", verb, exc.reason)
            await self._reply(writer, _error(exc.reason, exc.exit_code))
            return
        except Exception as exc:
            log.error("control: stream %s failed", verb, exc_info=True)
            await self._reply(writer, _error(_internal(exc), EXIT_INTERNAL))
            return
        pump = asyncio.create_task(self._pump(verb, events, writer))
        watch = asyncio.create_task(_until_eof(reader))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()  # runs the generator's finally (unsubscribes from the event log)

    async def _pump(
        self, verb: str, events: AsyncIterator[Mapping[str, Any]], writer: asyncio.StreamWriter
    ) -> None:
        try:
            async for event in events:
                writer.write(_encode({"ok": True, "event": event}))
                await writer.drain()  # a slow reader holds us here; the producer's queue drops
        except ControlRefused as exc:
            log.info("control: %s refused: %s", verb, exc.reason)
            writer.write(_error(exc.reason, exc.exit_code))
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:
            log.error("control: stream %s failed", verb, exc_info=True)
            writer.write(_error(_internal(exc), EXIT_INTERNAL))
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                await writer.drain()


def _internal(exc: Exception) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"


async def _until_eof(reader: asyncio.StreamReader) -> None:
    # After its request a streaming client sends nothing; whatever it does send is discarded.
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass


def _parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        request = json.loads(line)
    except UnicodeDecodeError:
        raise _BadRequest("request is not UTF-8") from None
    except ValueError as exc:
        raise _BadRequest(f"request is not JSON ({exc})") from None
    except RecursionError:
        raise _BadRequest("request nested too deeply") from None
    if not isinstance(request, dict):
        raise _BadRequest('request must be a JSON object {"verb": ..., "args": {...}}')
    verb = request.get("verb")
    if not isinstance(verb, str) or not verb:
        raise _BadRequest('"verb" must be a non-empty string')
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise _BadRequest('"args" must be a JSON object')
    unknown = set(request) - {"verb", "args"}
    if unknown:
        raise _BadRequest(f"unknown request keys: {', '.join(sorted(unknown))}")
    return verb, args


# --- client ---------------------------------------------------------------------------------


async def _connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            return await asyncio.open_unix_connection(os.fspath(path), limit=ANSWER_BYTES_MAX)
    except TimeoutError:
        raise ControlError(
            f"cannot reach the daemon at {path}: no answer within {CONNECT_TIMEOUT_S:g} s"
        ) from None
    except OSError as exc:
        raise ControlError(
            f"cannot reach the daemon at {path}: {exc.strerror or exc} (is it running?)"
        ) from exc


async def _send_request(
    writer: asyncio.StreamWriter, verb: str, args: Mapping[str, Any], path: Path
) -> None:
    line = _encode({"verb": verb, "args": dict(args)})
    if len(line) - 1 > REQUEST_BYTES_MAX:
        raise ControlError(f"request for {verb} is larger than {REQUEST_BYTES_MAX} bytes")
    writer.write(line)
    try:
        await writer.drain()
    except ConnectionError as exc:
        raise ControlError(f"the daemon at {path} closed the connection: {exc}") from exc


async def _read_answer(reader: asyncio.StreamReader, path: Path) -> dict[str, Any] | None:
    """The next answer line as a dict; None at a clean end of stream."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ControlError(f"the daemon at {path} sent a truncated answer") from None
        return None
    except asyncio.LimitOverrunError:
        raise ControlError(
            f"the daemon at {path} sent an answer over {ANSWER_BYTES_MAX} bytes"
        ) from None
    except ConnectionError as exc:
        raise ControlError(f"the daemon at {path} closed the connection: {exc}") from exc
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"bad answer from the daemon at {path}: not JSON") from exc
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError(f"bad answer from the daemon at {path}: no ok field")
    if not answer["ok"]:
        error, code = answer.get("error"), answer.get("exit_code")
        raise ControlRefused(
            error if isinstance(error, str) else "refused (no reason given)",
            code if isinstance(code, int) and not isinstance(code, bool) else EXIT_REFUSED,
        )
    return answer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def call(
    path: Path, verb: str, args: Mapping[str, Any] = _NOTHING, timeout_s: float = 30.0
) -> Mapping[str, Any]:
    """Run a plain verb; its result, or ControlRefused (refused) / ControlError (no exchange)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await _connect(path)
            try:
                await _send_request(writer, verb, args, path)
                answer = await _read_answer(reader, path)
            finally:
                await _close(writer)
    except TimeoutError:
        raise ControlError(
            f"no answer from the daemon at {path} within {timeout_s:g} s ({verb})"
        ) from None
    if answer is None:
        raise ControlError(f"the daemon at {path} closed the connection without answering")
    result = answer.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"bad answer from the daemon at {path}: no result object")
    return result


async def stream(
    path: Path, verb: str, args: Mapping[str, Any] = _NOTHING
) -> AsyncGenerator[Mapping[str, Any], None]:
    """Events of a streaming verb until the daemon ends the stream; close the iterator to leave.

    ControlRefused when the daemon refuses (also mid-stream), ControlError when it cannot be
    reached or garbles its answer. There is no timeout between events: a quiet pair is quiet.
    """
    reader, writer = await _connect(path)
    try:
        await _send_request(writer, verb, args, path)
        while (answer := await _read_answer(reader, path)) is not None:
            event = answer.get("event")
            if not isinstance(event, dict):
                raise ControlError(f"bad answer from the daemon at {path}: no event object")
            yield event
    finally:
        await _close(writer)
