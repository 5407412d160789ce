"""The journal group's metrics, read from its live state at each scrape.

    scrape ─► GroupCollector.collect()
                 ├─ source.display()      the same dict `pairctl display --json` prints:
                 │                        state, lag, journal, copy, link
                 ├─ source.dirty_bytes()  difference-bitmap bytes per volume
                 ├─ source.host_io        per-export HostIoStats (NBD server)
                 ├─ source.link           LinkStats (replication server or puller)
                 ├─ source.journal_sync   the journal's fdatasync LatencyHistogram
                 └─ source.read_journal_age_s()   primary only
              ─► prometheus_client metric families (exposition by the library)

Nothing is registered per metric, so a service that starts again (a role swap) makes a
new registry with a new collector, and nothing can be registered twice. Every series has
the labels group and role (the role this site has now); per-volume ones also volume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from common.metrics.histogram import LatencyHistogram
from common.nbd.iostats import OPS, HostIoStats
from common.pairstate import PairState
from common.replication.linkstats import LinkStats

__all__ = ["METRIC_NAMES", "GroupCollector", "MetricsSource"]

PREFIX = "journalpair_"
_GROUP = ["group", "role"]
_VOLUME = [*_GROUP, "volume"]
_OP = [*_VOLUME, "op"]
_DATA_OPS = ("read", "write", "trim", "zero")  # ops whose length is data (bytes_total)

# Every family this collector yields (the alert rules' test checks they name real ones).
METRIC_NAMES = frozenset(
    PREFIX + name
    for name in (
        "pair_state",
        "lag_entries",
        "lag_bytes",
        "lag_seconds",
        "journal_used_bytes",
        "journal_capacity_bytes",
        "copy_done_bytes",
        "copy_total_bytes",
        "bitmap_dirty_bytes",
        "link_up",
        "link_sent_bytes_total",
        "link_received_bytes_total",
        "link_reconnects_total",
        "host_requests_total",
        "host_bytes_total",
        "host_request_seconds",
        "journal_sync_seconds",
        "read_journal_age_seconds",
    )
)


@dataclass(frozen=True, slots=True)
class MetricsSource:
    """Where a role's service keeps what the metrics show (read at scrape time)."""

    display: Callable[[], Mapping[str, Any]]
    dirty_bytes: Callable[[], Mapping[str, int]]
    host_io: Mapping[str, HostIoStats]
    link: LinkStats
    journal_sync: LatencyHistogram
    # Seconds since the secondary's last read-journal request (primary only).
    read_journal_age_s: Callable[[], float] | None = None


class GroupCollector:
    """A prometheus_client collector (has collect()) over one running service's state."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        source = self.source
        shown = source.display()
        group = [str(shown["group"]), str(shown["role"])]
        yield _state(group, str(shown["state"]))
        yield from _pair_gauges(group, shown)
        dirty = GaugeMetricFamily(
            PREFIX + "bitmap_dirty_bytes",
            "Bytes of the volume marked in the difference bitmap (copied at the next resync)",
            labels=_VOLUME,
        )
        for volume, nbytes in source.dirty_bytes().items():
            dirty.add_metric([*group, volume], nbytes)
        yield dirty
        yield from _link(group, shown, source.link)
        yield from _host_io(group, source.host_io)
        sync = HistogramMetricFamily(
            PREFIX + "journal_sync",
            "Time of each fdatasync of the journal (master journal on the primary, restore "
            "journal on the secondary), seconds",
            labels=_GROUP,
            unit="seconds",
        )
        _add_histogram(sync, group, source.journal_sync)
        yield sync
        if source.read_journal_age_s is not None:
            yield _gauge(
                "read_journal_age_seconds",
                "Seconds since the secondary's last read-journal request (since the daemon "
                "started if none came since)",
                group,
                source.read_journal_age_s(),
            )


def _gauge(name: str, doc: str, group: Sequence[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=_GROUP)
    family.add_metric(list(group), value)
    return family


def _state(group: Sequence[str], current: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        PREFIX + "pair_state",
        "1 for the pair state this site is in (RAID Manager names), 0 for the others",
        labels=[*_GROUP, "state"],
    )
    for state in PairState:
        family.add_metric([*group, state.value], 1.0 if state.value == current else 0.0)
    return family


def _pair_gauges(group: Sequence[str], shown: Mapping[str, Any]) -> Iterator[Metric]:
    lag, journal = shown["lag"], shown["journal"]
    copy = shown.get("copy") or {"done_bytes": 0, "total_bytes": 0}
    yield _gauge(
        "lag_entries",
        "Journal entries the primary holds that the secondary has not applied",
        group,
        lag["entries"],
    )
    yield _gauge("lag_bytes", "Bytes of those entries", group, lag["bytes"])
    yield _gauge(
        "lag_seconds", "Age of the oldest entry not applied on the secondary", group, lag["seconds"]
    )
    yield _gauge(
        "journal_used_bytes",
        "Bytes of the journal in use (master journal on the primary, restore journal on the "
        "secondary)",
        group,
        journal["used_bytes"],
    )
    yield _gauge(
        "journal_capacity_bytes", "journal.capacity of this site", group, journal["capacity_bytes"]
    )
    yield _gauge(
        "copy_done_bytes",
        "Bytes the initial copy or resync has sent (0 outside COPY)",
        group,
        copy["done_bytes"],
    )
    yield _gauge(
        "copy_total_bytes",
        "Bytes the initial copy or resync will send (0 outside COPY)",
        group,
        copy["total_bytes"],
    )


def _link(group: Sequence[str], shown: Mapping[str, Any], link: LinkStats) -> Iterator[Metric]:
    yield _gauge(
        "link_up",
        "1 while the replication link is up (the secondary welcomed by the primary)",
        group,
        1.0 if shown["link"]["up"] else 0.0,
    )
    for name, doc, value in (
        ("link_sent_bytes", "Replication protocol bytes sent to the other site", link.sent_bytes),
        (
            "link_received_bytes",
            "Replication protocol bytes received from the other site",
            link.received_bytes,
        ),
        (
            "link_reconnects",
            "Times the replication link came up again after its first time since start",
            link.reconnects,
        ),
    ):
        family = CounterMetricFamily(PREFIX + name, doc, labels=_GROUP)
        family.add_metric(list(group), value)
        yield family


def _host_io(group: Sequence[str], host_io: Mapping[str, HostIoStats]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        PREFIX + "host_requests",
        "NBD requests answered, per volume and op (read, write, trim, zero, flush, other)",
        labels=_OP,
    )
    data = CounterMetricFamily(
        PREFIX + "host_bytes",
        "Bytes hosts read, wrote, trimmed or zeroed over NBD",
        labels=_OP,
    )
    latency = HistogramMetricFamily(
        PREFIX + "host_request",
        "Time from receiving an NBD request to its reply (after the volume I/O, and the "
        "fdatasync for FLUSH and FUA), seconds",
        labels=_OP,
        unit="seconds",
    )
    for volume, stats in host_io.items():
        for index, op in enumerate(OPS):
            labels = [*group, volume, op]
            requests.add_metric(labels, stats.requests[index])
            if op in _DATA_OPS:
                data.add_metric(labels, stats.bytes[index])
            _add_histogram(latency, labels, stats.latency[index])
    yield requests
    yield data
    yield latency


def _add_histogram(
    family: HistogramMetricFamily, labels: Sequence[str], histogram: LatencyHistogram
) -> None:
    family.add_metric(list(labels), histogram.buckets(), histogram.sum_s)
