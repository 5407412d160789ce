"""nbdcopy (both directions) and fio --ioengine=nbd with crc32c verification."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Daemon, Daemons, MiB, qemu_io, run, sha256_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_nbdcopy_file_to_export_and_back_keeps_sha256(daemons: Daemons, tmp_path: Path) -> None:
    size = 32 * MiB
    primary = daemons.start_primary(volumes=[("vol0", size)])
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    rng = random.Random(7)
    with open(source, "wb") as file:
        for index in range(size // MiB):
            # Every fourth MiB is zeroes, so the sparse paths (zero/trim) are used too.
            file.write(bytes(MiB) if index % 4 == 3 else rng.randbytes(MiB))
    qemu_io(primary.uri(), f"write -P 0x77 {3 * MiB} {MiB}")  # overwritten by zeroes

    run(["nbdcopy", "--connections=4", "--requests=16", source, primary.uri()])
    run(["nbdcopy", "--connections=4", "--requests=16", primary.uri(), back])

    expected = sha256_file(source)
    assert sha256_file(back) == expected, "nbd -> file copy differs from the source"
    assert sha256_file(primary.volume().path) == expected, "volume file differs from the source"


def run_fio(tmp_path: Path, name: str, *args: str, check: bool = True) -> dict[str, Any]:
    """fio with JSON output in a file (fio prints a libnbd banner on stdout)."""
    output = tmp_path / f"{name}.json"
    result = run(
        ["fio", f"--name={name}", "--output-format=json", f"--output={output}", *args],
        check=check,
        timeout=90,
        cwd=tmp_path,  # fio leaves *-verify.state files in its working directory
    )
    report: dict[str, Any] = json.loads(output.read_text())
    report["_stderr"] = result.stderr
    report["_returncode"] = result.returncode
    return report


def assert_fio_clean(report: dict[str, Any], verified_bytes: int) -> None:
    assert report["_returncode"] == 0, report["_stderr"]
    assert "verify:" not in report["_stderr"], report["_stderr"]
    for job in report["jobs"]:
        assert job["error"] == 0, f"fio job {job['jobname']} error {job['error']}"
        assert job["read"]["io_bytes"] == verified_bytes, "verify phase did not read it all back"


def test_fio_randwrite_qd16_verifies_crc32c(primary: Daemon, tmp_path: Path) -> None:
    size = 32 * MiB
    report = run_fio(
        tmp_path,
        "randwrite-verify",
        "--ioengine=nbd",
        f"--uri={primary.uri()}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        f"--size={size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    )

    assert_fio_clean(report, verified_bytes=size)
    assert report["jobs"][0]["write"]["io_bytes"] == size


def test_fio_four_connections_write_disjoint_ranges_then_verify_only(
    primary: Daemon, tmp_path: Path
) -> None:
    per_job = 12 * MiB
    job = [
        "--ioengine=nbd",
        f"--uri={primary.uri()}",
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        "--numjobs=4",  # one NBD connection per job
        f"--size={per_job}",
        f"--offset_increment={per_job}",
        "--verify=crc32c",
        "--verify_fatal=1",
    ]
    written = run_fio(tmp_path, "multi", *job, "--do_verify=1")
    assert_fio_clean(written, verified_bytes=per_job)
    assert len(written["jobs"]) == 4

    # A second run of the same jobs reads everything back over new connections.
    reread = run_fio(tmp_path, "multi", *job, "--verify_only")
    assert_fio_clean(reread, verified_bytes=per_job)
