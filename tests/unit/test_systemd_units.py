"""deploy/systemd: the units pass `systemd-analyze verify` and start the right program.

The units name /opt/journalpair/.venv (README: the install-free path); verify insists that
ExecStart is executable, so each unit is checked as a copy pointing at this checkout's .venv.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED_VENV = "/opt/journalpair/.venv"
VENV_BIN = Path(sys.executable).parent
PROGRAMS = {
    "journalpair-primary.service": "primaryd",
    "journalpair-secondary.service": "secondaryd",
}


def _service_section(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read(path)
    return parser["Service"]


@pytest.mark.parametrize("unit", sorted(PROGRAMS))
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    text = (UNITS / unit).read_text()
    assert f"ExecStart={INSTALLED_VENV}/bin/" in text
    copy = tmp_path / unit
    copy.write_text(text.replace(INSTALLED_VENV, os.fspath(VENV_BIN.parent)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", os.fspath(copy)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # verify exits 0 after mere warnings (an unknown key, a bad value): they fail here too
    assert (proc.returncode, proc.stderr.strip()) == (0, ""), proc.stderr


@pytest.mark.parametrize("unit", sorted(PROGRAMS))
def test_unit_runs_its_program_as_a_notify_service_that_restarts_on_failure(unit: str) -> None:
    service = _service_section(UNITS / unit)
    program, flag, config = service["ExecStart"].split()
    assert (Path(program).name, flag) == (PROGRAMS[unit], "--config")
    assert config.endswith(".yaml")
    assert service["Type"] == "notify"  # common/sdnotify.py: READY=1
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a config error: a restart cannot help
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/journalpair" in service["ReadWritePaths"].split()
    assert service["NoNewPrivileges"] == "yes"
