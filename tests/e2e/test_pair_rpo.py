"""The RPO target of a group (pair.rpo_target_s) and inflow control (pair.inflow_control).

    host writer (QD1, 4 KiB, paced) ─► primaryd ◄── FaultProxy (throttled) ◄── secondaryd
    the lag in seconds grows past rpo_target_s ─► rpo_exceeded (pairctl events, WARNING line)
    the writer stops, the secondary catches up   ─► rpo_recovered, with the peak lag
    the same burst with inflow_control: true     ─► host write replies held a few ms, and the
                                                     peak lag is lower

The writer runs in its own process (libnbd), paced at WRITES_PER_S: it offers the same load
to both pairs for the same time; only inflow control (the primary holding its replies) can
make it write less. The peak lag is the primary's own measure (every 0.1 s, in the
rpo_recovered event), so the test does not poll the daemon under load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import (
    Daemon,
    Daemons,
    MiB,
    events,
    pair_through_proxy,
    wait_caught_up,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

RPO_TARGET_S = 0.2
LINK_BYTES_PER_S = 2 * MiB  # about 500 records of 4 KiB a second
WRITES_PER_S = 1000  # twice what the link carries
WRITE_S = 2.0
BLOCK = 4096

# One QD1 host: 4 KiB writes at a fixed pace for a fixed time; prints how many it made and
# the slowest reply in ms.
WRITER = """
import sys, time, nbd
uri, rate, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
handle = nbd.NBD()
handle.connect_uri(uri)
block = bytearray(b"r" * 4096)
start = time.monotonic()
n, slowest = 0, 0.0
while time.monotonic() - start < duration:
    due = start + n / rate
    now = time.monotonic()
    if now < due:
        time.sleep(due - now)  # pacing the offered load, not waiting for a state
    began = time.monotonic()
    handle.pwrite(block, (n % 4096) * 4096)
    slowest = max(slowest, time.monotonic() - began)
    n += 1
handle.shutdown()
print(n, round(slowest * 1000, 2))
"""


def burst(primary: Daemon) -> tuple[int, float]:
    """The paced writer against the primary: (writes acknowledged, slowest reply in ms)."""
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, primary.uri(), str(WRITES_PER_S), str(WRITE_S)],
        capture_output=True,
        text=True,
        timeout=WRITE_S + 30,
        check=True,
    )
    count, slowest_ms = proc.stdout.split()
    return int(count), float(slowest_ms)


def rpo_events(primary: Daemon) -> list[dict[str, Any]]:
    return [e for e in events(primary) if e["kind"] in ("rpo_exceeded", "rpo_recovered")]


def burst_over_a_slow_link(
    daemons: Daemons, proxies: list[FaultProxy], inflow_control: bool
) -> tuple[Daemon, dict[str, Any], int, float]:
    """A pair through a throttled link, the burst, the lag back to 0: (primary, the
    rpo_recovered event, writes acknowledged, slowest reply ms)."""
    pair = {"rpo_target_s": RPO_TARGET_S, "inflow_control": inflow_control}
    primary, _secondary, proxy = pair_through_proxy(daemons, proxies, pair=pair)
    proxy.set_throttle(LINK_BYTES_PER_S)
    writes, slowest_ms = burst(primary)
    wait_caught_up(primary, 60)
    recovered = wait_until(
        lambda: [e for e in rpo_events(primary) if e["kind"] == "rpo_recovered"],
        10,
        "rpo_recovered after the burst",
        interval_s=0.2,
    )
    proxy.restore()
    return primary, recovered[-1], writes, slowest_ms


def assert_told_over_and_back_under(primary: Daemon, recovered: dict[str, Any]) -> None:
    told = rpo_events(primary)
    assert [e["kind"] for e in told] == ["rpo_exceeded", "rpo_recovered"], told
    exceeded = told[0]
    assert exceeded["old"] == exceeded["new"] == "PAIR"
    assert exceeded["lag_s"] > RPO_TARGET_S and exceeded["target_s"] == RPO_TARGET_S
    assert exceeded["reason"].startswith("lag ") and "over rpo_target_s 0.2" in exceeded["reason"]
    assert recovered["lag_s"] <= RPO_TARGET_S * 0.8
    assert recovered["peak_lag_s"] >= exceeded["lag_s"]
    assert "back under rpo_target_s 0.2 (peak " in recovered["reason"]
    warning = [line for line in primary.log_text().splitlines() if "rpo_exceeded in PAIR" in line]
    assert len(warning) == 1 and " WARNING " in warning[0], warning


def test_a_burst_past_the_rpo_target_is_told_and_inflow_control_keeps_the_lag_lower(
    daemons: Daemons, proxied: list[FaultProxy]
) -> None:
    """The same paced burst on two pairs, without and with inflow control: both tell when
    the lag crossed the target and when it was back under; holding the write replies kept
    the lag peak lower."""
    plain, without, writes_without, slowest_without = burst_over_a_slow_link(
        daemons, proxied, False
    )
    assert writes_without * BLOCK > LINK_BYTES_PER_S * RPO_TARGET_S, "too small to lag"
    assert_told_over_and_back_under(plain, without)
    held, with_inflow, writes_with, slowest_with = burst_over_a_slow_link(daemons, proxied, True)
    assert_told_over_and_back_under(held, with_inflow)
    measured = {
        "peak_lag_s": (without["peak_lag_s"], with_inflow["peak_lag_s"]),
        "writes": (writes_without, writes_with),
        "slowest_reply_ms": (slowest_without, slowest_with),
    }
    print("without / with inflow control:", json.dumps(measured))
    exceeded = [e for e in rpo_events(held) if e["kind"] == "rpo_exceeded"]
    assert "inflow control: host write replies delayed" in exceeded[0]["reason"]
    # The lag peak is the claim. How many writes the host made depends on when the watch
    # (every 0.1 s) saw the target crossed, which a loaded machine delays: reported only.
    assert with_inflow["peak_lag_s"] < without["peak_lag_s"], measured
