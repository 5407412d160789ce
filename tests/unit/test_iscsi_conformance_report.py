"""scripts/iscsi_conformance.py reads iscsi-test-cu's verbose stdout: passed, failed with its
asserts, skipped (whole, or only a part that needs a command outside the selection), and a
report that disagrees with CUnit's own summary is an error, not a result."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "iscsi_conformance.py"

# Shapes taken from a real run (libiscsi-bin 1.19, CUnit 2.1-3), shortened.
REPORT = """\
    Send PRIN/READ_KEYS
    [SKIPPED] PERSISTENT RESERVE IN is not implemented.


     CUnit - A unit testing framework for C - Version 2.1-3

Suite: Read10
  Test: Simple ...
    Send READ10 (Expecting SUCCESS) LBA:0 blocks:1
    [OK] READ10 returned SUCCESS NO SENSE(0x00) (null)(0x0000)
passed
  Test: DpoFua ...
    Send REPORT_SUPPORTED_OPCODE (Expecting SUCCESS) RCTD:0
    [SKIPPED] REPORT_SUPPORTED_OPCODES is not implemented.
passed    Send PRIN/READ_KEYS
    [SKIPPED] PERSISTENT RESERVE IN is not implemented.

Suite: Unmap
  Test: Simple ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
passed
Suite: iSCSIdatasn
  Test: iSCSIDataSnInvalid ...
    Send WRITE10 (Expecting SUCCESS) LBA:100 blocks:2
    [FAILED] WRITE10 command failed with status 251658240 / sense key NO SENSE(0x00)
FAILED
    1. test_iscsi_datasn_invalid.c:116  - CU_ASSERT_NOT_EQUAL(ret,0)    Send PRIN/READ_KEYS
    [SKIPPED] PERSISTENT RESERVE IN is not implemented.


Run Summary:    Type  Total    Ran Passed Failed Inactive
              suites      3      3    n/a      0        0
               tests      4      4      3      1        0
             asserts     40     40     39      1      n/a
"""


@pytest.fixture(scope="module")
def conformance() -> ModuleType:
    spec = importlib.util.spec_from_file_location("iscsi_conformance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_test_gets_its_outcome_and_why(conformance: ModuleType) -> None:
    results = {r.name: r for r in conformance.parse_report(REPORT)}
    assert list(results) == [
        "Read10.Simple",
        "Read10.DpoFua",
        "Unmap.Simple",
        "iSCSIdatasn.iSCSIDataSnInvalid",
    ]
    assert results["Read10.Simple"].outcome == "passed"
    assert results["Read10.Simple"].message == ""
    # only its REPORT SUPPORTED OPERATION CODES cross-check was skipped: the test itself ran
    assert results["Read10.DpoFua"].outcome == "passed"
    assert "part skipped" in results["Read10.DpoFua"].message
    assert results["Unmap.Simple"].outcome == "skipped"
    assert "fully provisioned" in results["Unmap.Simple"].message
    failed = results["iSCSIdatasn.iSCSIDataSnInvalid"]
    assert failed.outcome == "failed"
    assert failed.message.splitlines() == [
        "test_iscsi_datasn_invalid.c:116  - CU_ASSERT_NOT_EQUAL(ret,0)",
        "[FAILED] WRITE10 command failed with status 251658240 / sense key NO SENSE(0x00)",
    ]


def test_a_report_that_disagrees_with_the_summary_is_an_error(conformance: ModuleType) -> None:
    lost_a_test = REPORT.replace("  Test: Simple ...    [SKIPPED]", "  Tests: Simple ...")
    with pytest.raises(conformance.ConformanceError, match="summary says 4 ran"):
        conformance.parse_report(lost_a_test)


def test_a_run_cut_short_is_an_error(conformance: ModuleType) -> None:
    with pytest.raises(conformance.ConformanceError, match="no Run Summary"):
        conformance.parse_report(REPORT.split("Run Summary")[0])
