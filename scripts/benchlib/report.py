"""The tables bench.py prints: ratios first, then what each server costs per request.

Every ratio is taken per repetition (journalpair's run / the peer's run in the same
repetition, which ran minutes apart at most) and shown as median [min-max] over repetitions.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from benchlib.jobs import Job

JP = "journalpair"
PEERS = ("qemu-nbd", "qemu-mirror")  # what journalpair is compared with, in this order
DRAIN_RESOLUTION_S = 0.02  # servers.POLL_S: a drain ratio counts shorter drains as this long
RATIO_HEAD = {"qemu-nbd": "jp/qemu-nbd", "qemu-mirror": "jp/mirror"}
# bench_pipeline.py's per-rep time ratios: (row, numerator, denominator, key in their dicts)
PIPELINE_RATIOS = (
    ("copy / nbdcopy (time)", "copy", "nbdcopy", "seconds"),
    ("copy / nbdcopy --flush (time)", "copy", "nbdcopy_flush", "seconds"),
    ("copy / mirror (time)", "copy", "mirror_copy", "seconds"),
    ("copy_empty / mirror (time)", "copy_empty", "mirror_copy_empty", "seconds"),
    ("resync / copy (time)", "resync", "copy", "seconds"),
    ("burst drain / mirror (time)", "burst", "mirror_burst", "drain_s"),
)
Run = dict[str, Any]
Getter = Callable[[Run], float | None]


def field(*path: str) -> Getter:
    """A getter for run[path[0]][path[1]]...; None where any step is missing."""

    def get(run: Run) -> float | None:
        value: Any = run
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return None if value is None else float(value)

    return get


def total(key: str) -> Getter:
    """Sum of a per-process dict (e.g. CPU per request of primaryd + secondaryd)."""

    def get(run: Run) -> float | None:
        parts = run.get(key)
        return float(sum(parts.values())) if isinstance(parts, dict) and parts else None

    return get


def by_rep(runs: list[Run], job: str, server: str, get: Getter) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in runs:
        if r["job"] == job and r["server"] == server:
            value = get(r)
            if value is not None:
                out[r["rep"]] = value
    return out


def ratios(runs: list[Run], job: str, mine: str, other: str, get: Getter) -> list[float]:
    a, b = by_rep(runs, job, mine, get), by_rep(runs, job, other, get)
    return [a[rep] / b[rep] for rep in sorted(a.keys() & b.keys()) if b[rep]]


def fmt_stat(xs: Sequence[float], spec: str = ".0f") -> str:
    if not xs:
        return "-"
    lo, mid, hi = min(xs), statistics.median(xs), max(xs)
    return f"{mid:{spec}} [{lo:{spec}}-{hi:{spec}}]" if len(xs) > 1 else f"{mid:{spec}}"


def fmt_num(x: float | None, spec: str) -> str:
    return "-" if x is None else f"{x:{spec}}"


def render(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Columns padded to their widest cell; the first `left` columns left-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), *(line(r) for r in rows)]


def throughput_table(runs: list[Run], jobs: list[Job], servers: list[str]) -> list[str]:
    peers = [p for p in PEERS if p in servers and JP in servers]
    header = ["throughput", "unit", *servers, *(RATIO_HEAD[p] for p in peers)]
    rows = []
    for job in jobs:
        get = field(job.key)
        spec = ".0f" if job.unit == "IOPS" else ".1f"
        row = [job.name, job.unit]
        row += [fmt_stat(list(by_rep(runs, job.name, s, get).values()), spec) for s in servers]
        row += [fmt_stat(ratios(runs, job.name, JP, p, get), ".2f") for p in peers]
        rows.append(row)
    return render(header, rows, left=2)


def processes(runs: list[Run], server: str) -> list[str]:
    names: list[str] = []
    for r in runs:
        if r["server"] == server:
            names += [n for n in r.get("cpu_us_per_req", {}) if n not in names]
    return names


def cpu_cell(runs: list[Run], job: str, server: str) -> str:
    """'total (a+b)' in us per request, medians over reps; a single process alone."""
    parts = []
    for name in processes(runs, server):
        xs = list(by_rep(runs, job, server, field("cpu_us_per_req", name)).values())
        parts.append(statistics.median(xs) if xs else None)
    whole = list(by_rep(runs, job, server, total("cpu_us_per_req")).values())
    if not whole:
        return "-"
    if len(parts) == 1:
        return f"{statistics.median(whole):.1f}"
    return f"{statistics.median(whole):.1f} (" + "+".join(fmt_num(p, ".1f") for p in parts) + ")"


def cpu_table(runs: list[Run], jobs: list[Job], servers: list[str]) -> list[str]:
    peers = [p for p in PEERS if p in servers and JP in servers]
    heads = []
    for s in servers:
        names = processes(runs, s)
        heads.append(f"{s} ({'+'.join(names)})" if len(names) > 1 else s)
    header = ["server CPU per request, us", *heads, *(RATIO_HEAD[p] for p in peers)]
    rows = []
    for job in jobs:
        row = [job.name, *(cpu_cell(runs, job.name, s) for s in servers)]
        cpu = total("cpu_us_per_req")
        row += [fmt_stat(ratios(runs, job.name, JP, p, cpu), ".2f") for p in peers]
        rows.append(row)
    note = (
        "(utime+stime over fio after its ramp + the drain, / NBD requests fio completed,"
        " flushes included; median of reps)"
    )
    return [*render(header, rows), note]


def rss_table(runs: list[Run], jobs: list[Job], servers: list[str]) -> list[str]:
    columns = [(s, name) for s in servers for name in processes(runs, s)]
    header = ["peak RSS, MiB (max of reps)", *(name for _, name in columns)]
    rows = []
    for job in jobs:
        row = [job.name]
        for s, name in columns:
            xs = list(by_rep(runs, job.name, s, field("rss_peak_mib", name)).values())
            row.append(f"{max(xs):.0f}" if xs else "-")
        rows.append(row)
    return render(header, rows)


def replica_table(
    runs: list[Run], jobs: list[Job], instances: list[Run], servers: list[str]
) -> list[str]:
    """Seconds until the replica had every write, after each write job; the initial copy."""
    replicas = [s for s in (JP, "qemu-mirror") if s in servers]
    if not replicas:
        return []
    mirror = "qemu-mirror" in replicas and JP in replicas
    header = ["replica caught up, s", *replicas, *(["jp/mirror"] if mirror else [])]
    copies = [i | {"job": "copy"} for i in instances]
    seconds = {s: list(by_rep(copies, "copy", s, field("copy_s")).values()) for s in replicas}
    row = ["initial copy (whole volume)", *(fmt_stat(seconds[s], ".2f") for s in replicas)]
    if mirror:
        row.append(fmt_stat(ratios(copies, "copy", JP, "qemu-mirror", field("copy_s")), ".2f"))
    rows = [row]
    drain = field("drain_s")

    def resolved(run: Run) -> float | None:
        value = drain(run)
        return None if value is None else max(value, DRAIN_RESOLUTION_S)

    for job in jobs:
        if not job.writes:
            continue
        drains = {s: list(by_rep(runs, job.name, s, field("drain_s")).values()) for s in replicas}
        row = [f"after {job.name}", *(fmt_stat(drains[s], ".2f") for s in replicas)]
        if mirror:
            row.append(fmt_stat(ratios(runs, job.name, JP, "qemu-mirror", resolved), ".2f"))
        rows.append(row)
    note = f"(drain: from fio's end; ratios count a drain under {DRAIN_RESOLUTION_S} s as that)"
    return [*render(header, rows), note]


def latency_table(runs: list[Run], jobs: list[Job], servers: list[str]) -> list[str]:
    header = ["p99 completion latency, us", *servers]
    rows = [
        [job.name]
        + [
            fmt_stat(list(by_rep(runs, job.name, s, field("clat_p99_us")).values()))
            for s in servers
        ]
        for job in jobs
    ]
    return render(header, rows)


def checks(runs: list[Run], instances: list[Run]) -> list[str]:
    """What makes the numbers trustworthy: replicas equal, the pair stayed PAIR, peaks reset."""
    lines = []
    verified = [i for i in instances if "replica_equal" in i]
    bad = [
        f"{i['server']} rep {i['rep']} at byte {i['first_difference']}"
        for i in verified
        if not i["replica_equal"]
    ]
    lines.append(
        f"replica == volume after stop: {len(verified) - len(bad)}/{len(verified)}"
        + (f"; DIFFERENT: {', '.join(bad)}" if bad else "")
    )
    states = sorted({str(r["pair_state"]) for r in runs if "pair_state" in r})
    if states:
        lines.append(f"pair state after each journalpair job: {', '.join(states)}")
    if any(not r.get("rss_peak_reset", True) for r in runs):
        lines.append("note: peak RSS could not be reset per job (clear_refs): peaks since start")
    return lines


def pipeline_lines(doc: dict[str, Any]) -> list[str]:
    """bench_pipeline.py's results, whatever keys it has (lists of numbers, lists of dicts of
    numbers, dicts of those) as median [min-max]; and the ratios this bench can pair up."""
    rows: list[list[str]] = []
    for key, value in doc.items():
        if key != "settings":
            _flatten(key, value, rows)
    for name, num, den, key in PIPELINE_RATIOS:
        a, b = _seconds(doc.get(num), key), _seconds(doc.get(den), key)
        if a and b:
            rows.append([name, fmt_stat([x / y for x, y in zip(a, b, strict=False) if y], ".3f")])
    return render(["pipeline (bench_pipeline.py)", "median [min-max]"], rows) if rows else []


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _flatten(name: str, value: Any, rows: list[list[str]]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{name}.{key}", sub, rows)
    elif isinstance(value, list) and value and all(_number(x) for x in value):
        spec = ".0f" if statistics.median(value) >= 1000 else ".2f"
        rows.append([name, fmt_stat(value, spec)])
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        for key in value[0]:
            xs = [x[key] for x in value if _number(x.get(key))]
            if xs:
                _flatten(f"{name}.{key}", xs, rows)


def _seconds(value: Any, key: str) -> list[float]:
    """A list of seconds, or of dicts holding them under key, as floats."""
    if not isinstance(value, list):
        return []
    out = []
    for x in value:
        if isinstance(x, int | float):
            out.append(float(x))
        elif isinstance(x, dict) and isinstance(x.get(key), int | float):
            out.append(float(x[key]))
    return out
