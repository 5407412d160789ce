"""nbdinfo (libnbd-bin) sees what a host needs: exports, sizes, flags, block sizes, extents."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.helpers import Daemon, Daemons, MiB, qemu_io, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

WRITABLE_FLAGS = (
    "can_flush",
    "can_fua",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "can_cache",
    "can_multi_conn",
)


def nbdinfo_json(*args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(run(["nbdinfo", "--json", *args], timeout=30).stdout)
    return result


def only_export(info: dict[str, Any]) -> dict[str, Any]:
    exports: list[dict[str, Any]] = info["exports"]
    assert len(exports) == 1, exports
    return exports[0]


def nbdinfo_map(uri: str) -> list[dict[str, Any]]:
    extents: list[dict[str, Any]] = json.loads(
        run(["nbdinfo", "--map", "--json", uri], timeout=30).stdout
    )
    return extents


def extents_over(extents: list[dict[str, Any]], start: int, end: int) -> list[dict[str, Any]]:
    return [e for e in extents if e["offset"] < end and e["offset"] + e["length"] > start]


def assert_map_covers(extents: list[dict[str, Any]], size: int) -> None:
    position = 0
    for extent in extents:
        assert extent["offset"] == position, extents
        position += extent["length"]
    assert position == size, extents


def test_nbdinfo_reports_size_and_writable_flags_of_primary_export(primary: Daemon) -> None:
    info = nbdinfo_json(primary.uri())
    export = only_export(info)

    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True, "structured replies not negotiated"
    assert export["export-name"] == "vol0"
    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is False
    missing = [flag for flag in WRITABLE_FLAGS if export.get(flag) is not True]
    assert not missing, f"flags not advertised: {missing}\n{json.dumps(export, indent=1)}"
    assert "base:allocation" in export.get("contexts", []), export


def test_nbdinfo_reports_block_sizes_with_32mib_maximum(primary: Daemon) -> None:
    export = only_export(nbdinfo_json(primary.uri()))

    for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
        assert key in export, f"no NBD_INFO_BLOCK_SIZE in the reply: {key} missing: {export}"
    minimum = export["block_size_minimum"]
    preferred = export["block_size_preferred"]
    maximum = export["block_size_maximum"]
    assert minimum in (1, 512), export
    assert minimum <= preferred <= maximum, export
    assert maximum == 32 * MiB, export


def test_nbdinfo_lists_every_volume_as_an_export(daemons: Daemons) -> None:
    primary = daemons.start_primary(volumes=[("vol0", 64 * MiB), ("data-b", 16 * MiB)])

    info = nbdinfo_json("--list", primary.base_uri)

    sizes = {e["export-name"]: e["export-size"] for e in info["exports"]}
    assert sizes == {"vol0": 64 * MiB, "data-b": 16 * MiB}
    for export in info["exports"]:
        assert export["is_read_only"] is False, export


def test_nbdinfo_shows_secondary_export_read_only(secondary: Daemon) -> None:
    export = only_export(nbdinfo_json(secondary.uri()))

    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is True
    # Flags are advertised only when true: a read-only export cannot trim or write zeroes.
    advertised = [f for f in ("can_trim", "can_zero", "can_fast_zero") if export.get(f)]
    assert not advertised, f"read-only export advertises write commands: {advertised}"


def test_nbdinfo_map_shows_hole_for_empty_volume_and_data_after_write(primary: Daemon) -> None:
    size = 64 * MiB
    empty = nbdinfo_map(primary.uri())
    assert_map_covers(empty, size)
    assert all(e["type"] & 1 for e in empty), f"empty volume reports data: {empty}"

    qemu_io(primary.uri(), f"write -P 0x5a {4 * MiB} {1 * MiB}")

    written = nbdinfo_map(primary.uri())
    assert_map_covers(written, size)
    over_data = extents_over(written, 4 * MiB, 5 * MiB)
    assert over_data and all(e["type"] & 1 == 0 for e in over_data), written
    assert all(e["type"] & 2 == 0 for e in over_data), f"written data reported as zero: {written}"
    before = extents_over(written, 0, 4 * MiB - 64 * 1024)
    after = extents_over(written, 5 * MiB + 64 * 1024, size)
    assert all(e["type"] & 1 for e in before + after), f"untouched ranges not holes: {written}"
