"""common.hooks: the pair.hook command run for real, one transition at a time, in order."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.events import EventLog
from common.hooks import HOOK_OUTPUT_BYTES_MAX, HookRunner

pytestmark = pytest.mark.timeout(60)

LOGGER = "journalpair.hooks"

# Appends one line per run: the JP_* environment as JSON, plus what it read on stdin.
# mkdir is atomic: a second hook running at the same time would find the lock taken.
RECORDER = """\
#!/bin/sh
mkdir "$OUT.lock" 2>/dev/null || echo OVERLAP >> "$OUT.overlap"
stdin=$(cat)
"$PYTHON" - "$stdin" "$@" >> "$OUT" <<'EOF'
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("JP_")}
print(json.dumps({"env": env, "stdin": sys.argv[1], "argv": sys.argv[2:]}))
EOF
rmdir "$OUT.lock"
"""


def event(old: str, new: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {
        "time": "2026-11-24T10:00:00.000Z",
        "group": "jg0",
        "role": "primary",
        "old": old,
        "new": new,
        "reason": reason,
        **extra,
    }


def script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """(the hook script, the file it appends to); the file's path reaches it as $OUT."""
    out = tmp_path / "runs.jsonl"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("PYTHON", sys.executable)
    yield script(tmp_path / "hook.sh", RECORDER), out


def runs(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]


def runner(argv: list[str | Path], timeout_s: float = 10.0, **kwargs: Any) -> HookRunner:
    kwargs.setdefault("stop_wait_s", 30.0)  # stop() drains the queue: the test's sync point
    return HookRunner([str(a) for a in argv], timeout_s, group="jg0", role="primary", **kwargs)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


async def wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still running after {timeout_s} s"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_hook_gets_the_event_in_its_environment(
    recorder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hook, out = recorder
    monkeypatch.setenv("JP_FROM_PARENT", "kept")
    hooks = runner([hook, "two words", "$HOME"])
    hooks.start()
    sent = event("PAIR", "PSUE", "link down past path watch", seq=42)
    hooks.submit(sent)
    await hooks.stop()
    [run] = runs(out)
    env = run["env"]
    assert json.loads(env.pop("JP_EVENT")) == sent
    assert env == {
        "JP_FROM_PARENT": "kept",  # os.environ is passed on
        "JP_GROUP": "jg0",
        "JP_ROLE": "primary",
        "JP_EVENT_KIND": "transition",
        "JP_OLD_STATE": "PAIR",
        "JP_NEW_STATE": "PSUE",
        "JP_REASON": "link down past path watch",
        "JP_TIME": "2026-11-24T10:00:00.000Z",
    }
    assert run["argv"] == ["two words", "$HOME"]  # no shell: nothing split or expanded
    assert run["stdin"] == ""  # /dev/null


@pytest.mark.asyncio
async def test_the_events_role_wins_and_nul_is_dropped(recorder: tuple[Path, Path]) -> None:
    hook, out = recorder
    hooks = runner([hook])
    hooks.start()
    hooks.submit(event("PAIR", "SSWS", "peer said a\0b", role="secondary"))
    await hooks.stop()
    [run] = runs(out)
    assert run["env"]["JP_ROLE"] == "secondary"
    assert run["env"]["JP_REASON"] == "peer said ab"


@pytest.mark.asyncio
async def test_a_notice_names_its_kind(recorder: tuple[Path, Path]) -> None:
    hook, out = recorder
    hooks = runner([hook])
    hooks.start()
    hooks.submit(event("PAIR", "PAIR", "lag 3.1 s over rpo_target_s 2", kind="rpo_exceeded"))
    await hooks.stop()
    [run] = runs(out)
    kind_and_states = [run["env"][k] for k in ("JP_EVENT_KIND", "JP_OLD_STATE", "JP_NEW_STATE")]
    assert kind_and_states == ["rpo_exceeded", "PAIR", "PAIR"]


@pytest.mark.asyncio
async def test_hooks_run_one_at_a_time_in_submission_order(recorder: tuple[Path, Path]) -> None:
    hook, out = recorder
    hooks = runner([hook])
    hooks.start()
    count = 60
    for n in range(count):
        hooks.submit(event("PAIR", "PSUE", f"r{n}"))
        if n % 7 == 0:
            await asyncio.sleep(0)  # let the worker take some while others are still coming
    await hooks.stop()
    assert [r["env"]["JP_REASON"] for r in runs(out)] == [f"r{n}" for n in range(count)]
    assert not (out.parent / "runs.jsonl.overlap").exists(), "two hooks ran at once"


@pytest.mark.asyncio
async def test_events_submitted_before_start_wait_for_the_worker(
    recorder: tuple[Path, Path],
) -> None:
    hook, out = recorder
    hooks = runner([hook])
    hooks.submit(event("SMPL", "COPY", "create"))  # e.g. emitted during recovery
    assert hooks.pending == 1
    hooks.start()
    hooks.submit(event("COPY", "PAIR", "copy done"))
    await hooks.stop()
    assert [r["env"]["JP_NEW_STATE"] for r in runs(out)] == ["COPY", "PAIR"]


@pytest.mark.asyncio
async def test_a_hook_past_its_timeout_is_killed_with_its_children(
    tmp_path: Path, recorder: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, out = recorder
    pid_file = tmp_path / "sleep.pid"
    # The slow run leaves a grandchild (sleep) behind the shell: the whole group must die.
    body = f"""\
#!/bin/sh
if [ "$JP_REASON" = slow ]; then sleep 100 & echo $! > {pid_file}; wait; fi
echo "$JP_REASON" >> "$OUT"
"""
    hooks = runner([script(tmp_path / "slow.sh", body)], timeout_s=0.5)
    hooks.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        hooks.submit(event("PAIR", "PSUE", "slow"))
        hooks.submit(event("PSUE", "COPY", "next"))
        await hooks.stop()
    assert time.monotonic() - started < 10
    assert out.read_text().split() == ["next"]  # the next hook still ran; the slow one did not
    await wait_gone(int(pid_file.read_text()))
    [warning] = [r.getMessage() for r in caplog.records]
    assert "PAIR -> PSUE: no exit after 0.5 s: killed its process group" in warning


@pytest.mark.asyncio
async def test_a_missing_or_unexecutable_hook_is_a_warning_per_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_executable = tmp_path / "plain.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    for argv, why in ([tmp_path / "missing"], "No such file"), ([not_executable], "Permission"):
        hooks = runner(argv)
        hooks.start()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for n in range(3):
                hooks.submit(event("COPY", "PAIR", f"r{n}"))
            await hooks.stop()
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 3, messages
        assert all("cannot run" in m and why in m for m in messages), messages
        assert hooks.pending == 0


@pytest.mark.asyncio
async def test_non_zero_exit_is_a_warning_with_code_and_capped_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = "#!/bin/sh\necho to-stderr >&2\nhead -c 100000 /dev/zero | tr '\\0' x\nexit 3\n"
    hooks = runner([script(tmp_path / "fails.sh", body)])
    hooks.start()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        hooks.submit(event("PAIR", "PFUL", "journal high"))
        await hooks.stop()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "PAIR -> PFUL: exit code 3: to-stderr\nxxx" in message
    assert message.endswith(
        f"... ({100000 + len('to-stderr') + 1 - HOOK_OUTPUT_BYTES_MAX} more bytes)"
    )
    assert len(message) < HOOK_OUTPUT_BYTES_MAX + 200


@pytest.mark.asyncio
async def test_exit_zero_is_logged_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = runner([script(tmp_path / "ok.sh", "#!/bin/sh\necho fine\n")])
    hooks.start()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        hooks.submit(event("COPY", "PAIR", "copy done"))
        await hooks.stop()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, f"hook {tmp_path / 'ok.sh'} for COPY -> PAIR: exit 0: fine")
    ]


@pytest.mark.asyncio
async def test_full_queue_drops_the_oldest_counts_and_tells_the_next_hook(
    recorder: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    hook, out = recorder
    hooks = runner([hook], queue_max=3)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        for n in range(10):
            hooks.submit(event("PAIR", "PFUL", f"r{n}"))
        assert (hooks.pending, hooks.dropped) == (3, 7)
        assert len(caplog.records) == 1  # one ERROR per overflow, not one per event
        assert "hook queue full (3 events): dropping the oldest" in caplog.records[0].message
        hooks.start()
        await hooks.stop()
    seen = runs(out)
    assert [r["env"]["JP_REASON"] for r in seen] == ["r7", "r8", "r9"]
    assert json.loads(seen[0]["env"]["JP_EVENT"])["dropped"] == 7
    assert "dropped" not in json.loads(seen[1]["env"]["JP_EVENT"])
    assert "7 events dropped" in caplog.records[-1].getMessage()


@pytest.mark.asyncio
async def test_stop_waits_a_bounded_time_then_kills_the_running_hook(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "hook.pid"
    body = f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 100\n"
    hooks = runner([script(tmp_path / "hangs.sh", body)], timeout_s=100, stop_wait_s=0.3)
    hooks.start()
    hooks.submit(event("PAIR", "PSUS", "split"))
    hooks.submit(event("PSUS", "COPY", "resync"))
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the hook never started"
        await asyncio.sleep(0.02)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await hooks.stop()
    assert time.monotonic() - started < 5
    await wait_gone(int(pid_file.read_text()))
    assert "gave up on hooks after 0.3 s (1 queued events not run)" in caplog.text
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        hooks.submit(event("COPY", "PAIR", "late"))
    assert "hook not run for COPY -> PAIR: the daemon is stopping" in caplog.text


@pytest.mark.asyncio
async def test_event_log_feeds_the_runner(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    hook, out = recorder
    events = EventLog(tmp_path / "events.jsonl", "jg0", lambda: "secondary")
    hooks = runner([hook])
    events.add_listener(hooks.submit)
    hooks.start()
    events.emit("SMPL", "COPY", "create by primary")
    events.emit("COPY", "PAIR", "copy done", applied_seq=7)
    await hooks.stop()
    seen = [r["env"] for r in runs(out)]
    assert [(e["JP_OLD_STATE"], e["JP_NEW_STATE"], e["JP_ROLE"]) for e in seen] == [
        ("SMPL", "COPY", "secondary"),
        ("COPY", "PAIR", "secondary"),
    ]
    assert json.loads(seen[1]["JP_EVENT"]) == events.history()[1]


def test_runner_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="needs a command"):
        HookRunner([], 1.0, group="jg0", role="primary")
    with pytest.raises(ValueError, match="positive"):
        HookRunner(["true"], 0, group="jg0", role="primary")
    with pytest.raises(ValueError, match="positive"):
        HookRunner(["true"], 1.0, group="jg0", role="primary", queue_max=0)
