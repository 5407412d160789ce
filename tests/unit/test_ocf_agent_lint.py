"""deploy/ocf/journalpair is POSIX sh that shellcheck finds nothing in (it runs under dash)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

AGENT = Path(__file__).resolve().parents[2] / "deploy" / "ocf" / "journalpair"


def test_agent_is_clean_posix_sh_for_shellcheck() -> None:
    proc = subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", os.fspath(AGENT)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_agent_is_executable_by_everyone() -> None:
    # ocf-tester and Pacemaker's probes may run meta-data as another user (nobody)
    assert stat.S_IMODE(AGENT.stat().st_mode) == 0o755
    assert AGENT.read_text().startswith("#!/bin/sh\n")
