"""pair.hook: both daemons run the hook command for every transition, in order.

    primaryd ── hook.py primary-hooks.jsonl ──►  SMPL -> COPY, COPY -> PAIR   (JP_ROLE=primary)
    secondaryd ── hook.py secondary-hooks.jsonl ─► SMPL -> COPY, COPY -> PAIR (JP_ROLE=secondary)

Each line the hook writes is compared with the daemon's own event log (`pairctl events`): the
same transitions, in the same order, with the same reasons.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import (
    Daemon,
    Daemons,
    MiB,
    create_pair,
    display,
    pairctl,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SIZE = 8 * MiB

HOOK = """\
#!{python}
# A pair.hook: appends its JP_* environment to the file named by its argument.
import json, os, sys
env = {{k: v for k, v in os.environ.items() if k.startswith("JP_")}}
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(env) + "\\n")
"""


def write_hook(directory: Path) -> Path:
    hook = directory / "hook.py"
    hook.write_text(HOOK.format(python=sys.executable))
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    return hook


def start_pair_with(daemons: Daemons, pair: dict[str, dict[str, Any]]) -> tuple[Daemon, Daemon]:
    """A primary and a secondary, each with its own pair: section, linked, not yet paired."""
    volumes = (("vol0", SIZE),)
    primary = daemons.prepare("primary", volumes, pair=pair["primary"])
    primary.start()
    secondary = daemons.prepare(
        "secondary", volumes, primary_port=primary.peer_port, pair=pair["secondary"]
    )
    secondary.start()
    wait_until(lambda: display(primary)["link"]["up"], 15, "the secondary to connect")
    return primary, secondary


def hook_runs(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def logged_events(daemon: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in pairctl(daemon, "events").stdout.splitlines()]


def transitions(runs: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(run["JP_OLD_STATE"], run["JP_NEW_STATE"]) for run in runs]


def runs_up_to_pair(path: Path) -> list[dict[str, str]] | None:
    """The hook's runs once one of them is COPY -> PAIR; None before."""
    runs = hook_runs(path)
    return runs if ("COPY", "PAIR") in transitions(runs) else None


def test_hook_sees_create_and_copy_done_on_both_sites(daemons: Daemons, tmp_path: Path) -> None:
    hook = write_hook(tmp_path)
    out = {role: tmp_path / f"{role}-hooks.jsonl" for role in ("primary", "secondary")}
    pair = {role: {"hook": f"{hook} {out[role]}", "hook_timeout_s": 10} for role in out}
    primary, secondary = start_pair_with(daemons, pair)

    create_pair(primary, secondary)

    for daemon in (primary, secondary):
        # The hook runs after the transition, so PAIR may be shown before it has run.
        runs = wait_until(
            lambda path=out[daemon.role]: runs_up_to_pair(path),
            timeout_s=30,
            what=f"{daemon.name}'s hook to see COPY -> PAIR",
            interval_s=0.05,
        )
        seen = transitions(runs)
        assert seen.index(("SMPL", "COPY")) < seen.index(("COPY", "PAIR")), seen
        assert {run["JP_ROLE"] for run in runs} == {daemon.role}
        assert {run["JP_GROUP"] for run in runs} == {"jg0"}
        # Every transition the daemon logged, in its order, with its reason and time.
        logged = logged_events(daemon)
        assert [json.loads(run["JP_EVENT"]) for run in runs] == logged[: len(runs)]
        for run, event in zip(runs, logged, strict=False):
            assert run["JP_REASON"] == event["reason"] != ""
            assert run["JP_TIME"] == event["time"]
            assert (run["JP_OLD_STATE"], run["JP_NEW_STATE"]) == (event["old"], event["new"])


def test_a_missing_hook_is_logged_and_the_pair_still_forms(
    daemons: Daemons, tmp_path: Path
) -> None:
    # Relative to the config file's directory; nothing is there.
    pair = {role: {"hook": "./no-such-hook --flag"} for role in ("primary", "secondary")}
    primary, secondary = start_pair_with(daemons, pair)

    create_pair(primary, secondary)

    for daemon in (primary, secondary):
        missing = str(daemon.config_path.parent / "no-such-hook")
        wait_until(
            lambda d=daemon, m=missing: f"hook {m} for COPY -> PAIR: cannot run" in d.log_text(),
            timeout_s=30,
            what=f"{daemon.name} to log the missing hook",
        )
        assert display(daemon)["state"] == "PAIR"
