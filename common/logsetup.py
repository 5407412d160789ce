"""How the daemons' log lines look (log.format), how much they say (log.level), and SIGUSR1.

    log call ── log.info("...", extra={"group": "jg0", "seq": 42})   (or a FieldsAdapter)
        │ LogRecord with the structured fields as attributes
        ▼
    root handler (stderr) ── one formatter, chosen by log.format:
        text    2026-11-25 10:00:00,123 primaryd INFO journalpair.events: ... group=jg0 seq=42
        logfmt  time=2026-11-25T10:00:00.123Z level=info logger=... msg="..." group=jg0 seq=42
        json    {"time": "...", "level": "info", "logger": "...", "message": "...",
                 "group": "jg0", "seq": 42}
    SIGUSR1 ── toggle_debug(): DEBUG <-> log.level, the change logged at the level then in force

Every line is one line in every format: a message or a traceback holding newlines is escaped
(logfmt, json) or kept as Python prints it (text, for a human at a terminal). The structured
fields are those in FIELDS, taken from the record when a call site gave them; a field whose
value is None is left out. Call sites name what they know: a transition carries group, role,
state (the new one) and old; a journal event carries seq; an NBD event volume.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

__all__ = [
    "FIELDS",
    "LEVELS",
    "LOG_FORMATS",
    "FieldsAdapter",
    "JsonFormatter",
    "LogfmtFormatter",
    "TextFormatter",
    "configure",
    "fields",
    "toggle_debug",
]

LogFormat = Literal["text", "logfmt", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "logfmt", "json")
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# The structured fields a call site may give (extra=... or a FieldsAdapter), in output order.
FIELDS = ("group", "role", "state", "old", "event", "volume", "seq", "peer")

log = logging.getLogger("journalpair.log")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call site put on ``record``, in FIELDS order."""
    found = {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            found[name] = value
    return found


def _utc_iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created * 1000) % 1000:03d}Z"


def _message(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The message with its traceback and stack, if any (newlines still in it)."""
    text = record.getMessage()
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        text = f"{text}\n{record.exc_text}"
    if record.stack_info:
        text = f"{text}\n{formatter.formatStack(record.stack_info)}"
    return text


class TextFormatter(logging.Formatter):
    """The classic line for a human, with the structured fields appended as key=value."""

    def __init__(self, prog: str) -> None:
        super().__init__(f"%(asctime)s {prog} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        found = fields(record)
        if not found:
            return line
        head, sep, tail = line.partition("\n")  # after the message, before a traceback
        return (
            head
            + " "
            + " ".join(f"{k}={_logfmt_value(v)}" for k, v in found.items())
            + (sep + tail)
        )


class LogfmtFormatter(logging.Formatter):
    """key=value pairs on one line (logfmt, as Heroku and Grafana Loki read it)."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        pairs: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "prog": self.prog,
            "logger": record.name,
            "msg": _message(self, record),
            **fields(record),
        }
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in pairs.items())


def _logfmt_value(value: object) -> str:
    """Bare when safe; else double-quoted with \\ " and control characters escaped."""
    text = value if isinstance(value, str) else str(value)
    if text and not any(ch in text for ch in ' ="\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)  # JSON's string escapes are logfmt's


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the structured fields."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "prog": self.prog,
            "logger": record.name,
            "message": _message(self, record),
            **fields(record),
        }
        return json.dumps(obj, ensure_ascii=False, default=str, separators=(",", ":"))


_FORMATTERS: Mapping[str, type[TextFormatter | LogfmtFormatter | JsonFormatter]] = {
    "text": TextFormatter,
    "logfmt": LogfmtFormatter,
    "json": JsonFormatter,
}


class _State:
    """The level the config asked for; SIGUSR1 toggles between it and DEBUG."""

    configured_level = logging.INFO


def configure(prog: str, log_format: str = "text", level: str = "info") -> None:
    """One stderr handler on the root logger, with the chosen format and level (again: the
    config is read after the first lines may have been logged in the default format)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_journalpair", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._journalpair = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(_FORMATTERS[log_format](prog))
    _State.configured_level = LEVELS[level]
    root.setLevel(_State.configured_level)


def toggle_debug() -> None:
    """SIGUSR1: DEBUG if the level is the configured one, else back to the configured one.

    The change is logged at the level in force afterwards (at least INFO), so it shows in
    both directions unless the configured level hides INFO lines, when it is logged at that
    level."""
    root = logging.getLogger()
    configured = _State.configured_level
    if root.level != logging.DEBUG:
        root.setLevel(logging.DEBUG)
        log.info(
            "log level DEBUG (SIGUSR1; send it again for %s)", logging.getLevelName(configured)
        )
    else:
        root.setLevel(configured)
        log.log(
            max(logging.INFO, configured),
            "log level %s again (SIGUSR1)",
            logging.getLevelName(configured),
        )


class FieldsAdapter(logging.LoggerAdapter[logging.Logger]):
    """A logger that puts the same fields on every line (group, role...), merged with the
    call's own extra= (the call's win). Python 3.11's LoggerAdapter replaces extra= instead."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs
