"""Prometheus /metrics of both daemons: real values after real writes, and across a swap.

site A (primary, metrics.listen :MA)         site B (secondary, metrics.listen :MB)
create ─► PAIR; qemu-io writes N x 64 KiB to A ─► lag 0
scrape A and B (urllib, prometheus_client's parser): PAIR, lag 0, N host writes,
    journal capacity as configured, replication bytes > what was written
takeover on B (swap): each restarts as the other program in the same process and
    serves /metrics on the same port again ─► B primary PAIR, A secondary PAIR
split on B ─► PSUS on B, SSUS on A, in the state metric
"""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import load_config
from primaryd.group import LONG_POLL_MAX_S
from tests.e2e.disaster import prepare_swappable_sites, role_and_state
from tests.e2e.helpers import (
    HOST,
    Daemon,
    Daemons,
    KiB,
    create_pair,
    free_port,
    pairctl,
    qemu_io,
    run,
    run_daemon_to_exit,
    wait_caught_up,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WRITES = 5
WRITE_BYTES = 64 * KiB
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def enable_metrics(daemon: Daemon) -> int:
    port = free_port()
    with daemon.config_path.open("a") as config:
        config.write(f"metrics: {{listen: '{HOST}:{port}'}}\n")
    return port


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        return str(answer.read().decode())


def scrape(port: int) -> Samples:
    text = scrape_text(port)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_or_none(port: int) -> Samples | None:
    try:
        return scrape(port)
    except OSError:  # restarting in its other role: nobody listening for a moment
        return None


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def state_of(samples: Samples | None) -> tuple[str, str] | None:
    """(role, state) from the state metric: the one state set to 1."""
    if samples is None:
        return None
    on = [
        (dict(labels)["role"], dict(labels)["state"])
        for (name, labels), v in samples.items()
        if name == "journalpair_pair_state" and v == 1
    ]
    assert len(on) == 1, on
    return on[0]


def test_metrics_show_the_pair_the_writes_and_the_link_and_follow_a_swap(
    daemons: Daemons,
) -> None:
    a, b = prepare_swappable_sites(daemons, (("vol0", 64 * 1024 * KiB),))
    port_a, port_b = enable_metrics(a), enable_metrics(b)
    a.start()
    b.start()
    wait_until(lambda: state_of(scrape(port_a)) == ("primary", "SMPL"), 15, "A's metrics")
    wait_until(lambda: value(scrape(port_a), "journalpair_link_up") == 1, 15, "the link")
    create_pair(a, b)
    qemu_io(a.uri(), *(f"write -P {i + 1} {i * WRITE_BYTES} {WRITE_BYTES}" for i in range(WRITES)))
    wait_caught_up(a)

    on_a, on_b = scrape(port_a), scrape(port_b)
    assert state_of(on_a) == ("primary", "PAIR") and state_of(on_b) == ("secondary", "PAIR")
    assert value(on_a, "journalpair_lag_entries") == 0
    assert value(on_a, "journalpair_lag_seconds") == 0
    write = {"volume": "vol0", "op": "write"}
    assert value(on_a, "journalpair_host_requests_total", **write) == WRITES
    assert value(on_a, "journalpair_host_bytes_total", **write) == WRITES * WRITE_BYTES
    assert value(on_a, "journalpair_host_request_seconds_count", **write) == WRITES
    assert value(on_a, "journalpair_host_request_seconds_bucket", le="+Inf", **write) == WRITES
    assert value(on_a, "journalpair_host_requests_total", volume="vol0", op="read") == 0
    for samples, daemon in ((on_a, a), (on_b, b)):
        capacity = load_config(daemon.config_path).journal.capacity
        assert value(samples, "journalpair_journal_capacity_bytes") == capacity
        assert value(samples, "journalpair_journal_sync_seconds_count") > 0
        assert value(samples, "journalpair_bitmap_dirty_bytes", volume="vol0") == 0
        assert value(samples, "journalpair_link_up") == 1
    assert value(on_a, "journalpair_link_sent_bytes_total") > WRITES * WRITE_BYTES
    assert value(on_b, "journalpair_link_received_bytes_total") > WRITES * WRITE_BYTES
    assert value(on_b, "journalpair_link_sent_bytes_total") > 0
    for port in (port_a, port_b):  # Prometheus's own linter: names, types, units
        run(["promtool", "check", "metrics"], input=scrape_text(port).encode())
    wait_until(
        lambda: value(scrape(port_a), "journalpair_read_journal_age_seconds") < LONG_POLL_MAX_S,
        15,
        "a recent read-journal request",
    )

    assert pairctl(b, "takeover", check=False).returncode == 1  # a swap
    wait_until(lambda: role_and_state(b) == ("primary", "PAIR"), 30, "B to be the primary")
    wait_until(lambda: role_and_state(a) == ("secondary", "PAIR"), 30, "A to be the secondary")
    wait_until(lambda: state_of(scrape_or_none(port_b)) == ("primary", "PAIR"), 15, "B metrics")
    wait_until(lambda: state_of(scrape_or_none(port_a)) == ("secondary", "PAIR"), 15, "A metrics")
    for daemon in (a, b):  # each program served metrics.listen once, on the same port
        assert daemon.log_text().count("metrics: serving /metrics on") == 2, daemon.log_tail()

    pairctl(b, "split")
    wait_until(lambda: state_of(scrape(port_b)) == ("primary", "PSUS"), 15, "PSUS in B's metrics")
    wait_until(lambda: state_of(scrape(port_a)) == ("secondary", "SSUS"), 15, "SSUS in A's")


def test_a_bad_metrics_listen_is_one_config_error_line(daemons: Daemons) -> None:
    primary = daemons.prepare("primary")
    with primary.config_path.open("a") as config:
        config.write("metrics: {listen: 9100}\n")
    proc = run_daemon_to_exit("primary", primary.config_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "primaryd: config error: metrics.listen: bad address 9100 "
        "(want host:port; quote it in YAML)"
    ]


def test_a_metrics_port_in_use_stops_the_start_with_one_line(daemons: Daemons) -> None:
    primary = daemons.prepare("primary")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with primary.config_path.open("a") as config:
            config.write(f"metrics: {{listen: '{HOST}:{port}'}}\n")
        proc = run_daemon_to_exit("primary", primary.config_path)
    assert proc.returncode == 1
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"primaryd: cannot start: metrics.listen {HOST}:{port}: "), proc.stderr
    assert "address already in use" in last, proc.stderr
