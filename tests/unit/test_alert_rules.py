"""deploy/prometheus: the example alert rules load in Prometheus's own checker, fire as
their unit tests say, and name only metrics the daemons export."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from common.metrics.collector import METRIC_NAMES

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "journalpair-alerts.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    # promtool comes with Debian's prometheus package (make setup installs it).
    return subprocess.run(
        ["promtool", *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )


def test_promtool_checks_the_alert_rules() -> None:
    proc = promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


def test_alert_rules_fire_as_their_promtool_unit_tests_expect() -> None:
    proc = promtool("test", "rules", "journalpair-alerts.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_name_only_metrics_the_daemons_export() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    named = {m for rule in rules for m in re.findall(r"journalpair_[a-z_]+", rule["expr"])}
    assert named, "the rules name journalpair metrics"
    assert named <= METRIC_NAMES, named - METRIC_NAMES
