"""libiscsi's conformance suite (iscsi-test-cu) against the standalone target: every test of
scripts/iscsi_conformance.py's selection passes, but the known failures listed below.

The list is strict, like xfail(strict=True): a listed test that passes fails this test, so
whoever makes it pass deletes its line. ~20 s, most of it iSCSIcmdsn and iSCSITMF waiting out
their 3 s timeouts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.e2e.test_iscsi_initiators import start_target, stop_target

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "iscsi_conformance.py"

_ONE_BLOCK_PER_PHYSICAL = (
    "skipped by libiscsi: it runs only when a physical block holds several logical blocks; "
    "ours are 512-byte logical and physical blocks (see README, iSCSI)"
)
# test name (SUITE.TEST) -> why it does not pass. Delete a line when its test passes.
KNOWN_FAILURES: dict[str, str] = {
    "WriteSame16.UnmapUnaligned": _ONE_BLOCK_PER_PHYSICAL,
    "WriteSame16.InvalidDataOutSize": _ONE_BLOCK_PER_PHYSICAL,
}


def load_conformance() -> ModuleType:
    spec = importlib.util.spec_from_file_location("iscsi_conformance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_selection_passes_on_the_standalone_target(tmp_path: Path) -> None:
    conformance = load_conformance()
    assert conformance.unclassified_suites() == [], "classify new suites in iscsi_conformance"
    target = start_target(tmp_path)
    raw: list[str] = []
    try:
        results = conformance.run_conformance(target.lun_url, timeout_s=90, raw_output=raw)
    finally:
        stop_target(target)  # exit 0 and no traceback: the suite did not crash the target
    (tmp_path / "iscsi-test-cu.out").write_text("".join(raw))
    outcomes = {r.name: r for r in results}
    assert len(outcomes) == len(results), "a test ran twice"
    missing = sorted(KNOWN_FAILURES.keys() - outcomes.keys())
    assert not missing, f"known failures not in the selection any more: {missing}"
    now_pass = sorted(n for n in KNOWN_FAILURES if outcomes[n].outcome == "passed")
    assert not now_pass, f"these pass now: delete them from KNOWN_FAILURES: {now_pass}"
    broken = [
        f"{r.name}: {r.outcome}: {r.message}"
        for r in results
        if r.name not in KNOWN_FAILURES and r.outcome != "passed"
    ]
    assert not broken, "\n".join(broken) + f"\n(iscsi-test-cu output: {tmp_path})"
    ran_suites = {r.name.split(".")[0] for r in results}
    selected_suites = {pattern.split(".")[1] for pattern in conformance.SELECTION}
    assert ran_suites == selected_suites  # every suite of the selection did run
