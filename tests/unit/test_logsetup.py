"""common.logsetup: the three line formats, the structured fields, and the SIGUSR1 toggle."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from common import logsetup
from common.logsetup import FieldsAdapter, JsonFormatter, LogfmtFormatter, TextFormatter

TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(
    msg: str, *args: object, level: int = logging.INFO, exc: bool = False, **fields: object
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("journalpair.primary", level, __file__, 1, msg, args, exc_info)
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


def test_json_line_has_the_standard_keys_and_the_fields() -> None:
    line = JsonFormatter("primaryd").format(
        record("%s -> %s: %s", "PAIR", "PSUE", "link lost", group="jg0", state="PSUE", seq=42)
    )
    assert "\n" not in line
    obj = json.loads(line)
    assert TIME_RE.fullmatch(obj.pop("time"))
    assert obj == {
        "level": "info",
        "prog": "primaryd",
        "logger": "journalpair.primary",
        "message": "PAIR -> PSUE: link lost",
        "group": "jg0",
        "state": "PSUE",
        "seq": 42,
    }


def test_json_keeps_a_traceback_and_odd_text_on_one_line() -> None:
    line = JsonFormatter("secondaryd").format(
        record('quote " backslash \\ tab \t nul \0 é', level=logging.ERROR, exc=True)
    )
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "error"
    assert obj["message"].startswith('quote " backslash \\ tab \t nul \0 é\nTraceback')
    assert obj["message"].endswith("ValueError: bad\nthing")


def test_json_leaves_out_fields_not_given_or_none() -> None:
    obj = json.loads(JsonFormatter("p").format(record("x", volume=None, peer="1.2.3.4:5")))
    assert [k for k in obj if k in logsetup.FIELDS] == ["peer"]


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("plain", "msg=plain"),
        ("two words", 'msg="two words"'),
        ('say "hi"', 'msg="say \\"hi\\""'),
        ("a=b", 'msg="a=b"'),
        ("line one\nline two", 'msg="line one\\nline two"'),
        ("back\\slash", 'msg="back\\\\slash"'),
        ("", 'msg=""'),
        ("tab\there", 'msg="tab\\there"'),
    ],
)
def test_logfmt_quotes_what_would_break_a_pair(message: str, shown: str) -> None:
    line = LogfmtFormatter("primaryd").format(record(message))
    assert "\n" not in line
    head = re.fullmatch(r"time=(\S+) level=info prog=primaryd logger=\S+ (.*)", line)
    assert head is not None, line
    assert TIME_RE.fullmatch(head[1])
    assert head[2] == shown


def test_logfmt_fields_follow_the_message() -> None:
    line = LogfmtFormatter("primaryd").format(
        record("journal full", group="jg0", role="primary", seq=7, peer="10.0.0.2:7410")
    )
    assert line.endswith('msg="journal full" group=jg0 role=primary seq=7 peer=10.0.0.2:7410')


def test_logfmt_traceback_is_one_quoted_value() -> None:
    line = LogfmtFormatter("primaryd").format(record("failed", level=logging.ERROR, exc=True))
    assert "\n" not in line
    assert 'msg="failed\\nTraceback' in line
    assert line.endswith('ValueError: bad\\nthing"')


def test_text_keeps_the_classic_line_and_appends_fields() -> None:
    line = TextFormatter("primaryd").format(record("link up: ok", group="jg0", state="PAIR"))
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} primaryd INFO journalpair.primary: "
        r"link up: ok group=jg0 state=PAIR",
        line,
    ), line
    plain = TextFormatter("primaryd").format(record("no fields"))
    assert plain.endswith("journalpair.primary: no fields")


def test_text_puts_fields_before_a_traceback() -> None:
    line = TextFormatter("p").format(record("failed", level=logging.ERROR, exc=True, seq=3))
    first, _, rest = line.partition("\n")
    assert first.endswith("failed seq=3")
    assert rest.startswith("Traceback")


def test_adapter_merges_its_fields_with_the_calls() -> None:
    seen: list[logging.LogRecord] = []
    logger = logging.getLogger("journalpair.test.adapter")
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        adapter = FieldsAdapter(logger, {"group": "jg0", "role": "primary"})
        adapter.info("copy done", extra={"seq": 9, "role": "secondary"})
    finally:
        logger.removeHandler(handler)
    [rec] = seen
    assert logsetup.fields(rec) == {"group": "jg0", "role": "secondary", "seq": 9}


@pytest.fixture
def root_level() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)


@pytest.mark.usefixtures("root_level")
def test_toggle_switches_to_debug_and_back_to_the_configured_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logsetup.configure("primaryd", "json", "warning")
    root = logging.getLogger()
    assert root.level == logging.WARNING
    caplog.set_level(logging.DEBUG, logger="journalpair.log")
    logsetup.toggle_debug()
    assert root.level == logging.DEBUG
    logsetup.toggle_debug()
    assert root.level == logging.WARNING
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "journalpair.log"]
    assert said == [
        ("INFO", "log level DEBUG (SIGUSR1; send it again for WARNING)"),
        ("WARNING", "log level WARNING again (SIGUSR1)"),
    ]


@pytest.mark.usefixtures("root_level")
def test_configure_twice_keeps_one_handler() -> None:
    logsetup.configure("primaryd")
    logsetup.configure("primaryd", "logfmt", "error")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_journalpair", False)]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, LogfmtFormatter)
    assert logging.getLogger().level == logging.ERROR
