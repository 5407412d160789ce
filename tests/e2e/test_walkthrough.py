"""The README's two-host walkthrough runs for real: scripts/walkthrough.sh, two network
namespaces joined by a veth pair, a daemon in each (create, planned swap, disaster, SSWS,
resync --swap). The script checks the data at each step and exits non-zero on any miss."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "walkthrough.sh"


def test_the_two_host_walkthrough_runs_in_network_namespaces(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(SCRIPT), str(tmp_path / "walk")],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "A and B hold the same vol0" in proc.stdout
    for step in ("B$ pairctl", "takeover (swap): this site is the primary now", "SSWS"):
        assert step in proc.stdout, output[-6000:]
    assert proc.stdout.rstrip().endswith("== walkthrough done")
