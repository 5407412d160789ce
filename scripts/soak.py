"""make soak DURATION=...: the mixed fault scenarios of tests/e2e/disaster.py in a loop.

    workdir (--workdir, or a new temp dir; kept: it holds the summary)
      lab-1/   site A + site B, paired through one FaultProxy each
        round 1: scenario picked at random (seeded), its own seed ─► one line
        round 2 ...                        (the roles alternate with each disaster)
        a round that raises or finds a mismatch: its lab is killed and KEPT (path printed),
        a fresh lab-2/ takes over; a lab that ends cleanly is removed
      until --duration is up, or SIGTERM / SIGINT (the current round finishes)
      summary: rounds, faults by kind, writes acknowledged and lost, RPO, mismatches
               ─► stdout and summary.json; exit 1 on any mismatch or failed round

Replay: --seed S repeats the choice of scenarios and every round's seed (the timing of a
run on a busy machine is never quite the same); --scenarios narrows the mix.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.disaster import SCENARIOS, PairLab, RoundResult, run_round

WEIGHTS = {"disaster": 4, "secondary_crash": 2, "short_cut": 1, "long_cut": 2, "freeze": 1}


def duration_s(text: str) -> float:
    """600, 600s, 30m, 1h, 1h30m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or parts is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use 600, 30m, 1h)")
    hours, minutes, seconds = parts.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=duration_s, default=600.0, help="600, 30m, 1h")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}"
    )
    args = parser.parse_args()
    args.scenarios = args.scenarios.split(",")
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    return args


class Soak:
    def __init__(self, workdir: Path, seed: int, scenarios: list[str]) -> None:
        self.workdir, self.seed, self.scenarios = workdir, seed, scenarios
        self.rng = random.Random(seed)
        self.results: list[RoundResult] = []
        self.failed: list[dict[str, Any]] = []
        self.labs = 0
        self.lab: PairLab | None = None

    def new_lab(self) -> PairLab:
        self.labs += 1
        self.lab_dir = self.workdir / f"lab-{self.labs}"
        lab = PairLab(self.lab_dir)
        try:
            return lab.start()
        except BaseException:
            lab.close(clean=False)
            raise

    def round(self, number: int) -> None:
        scenario = self.rng.choices(self.scenarios, [WEIGHTS[s] for s in self.scenarios])[0]
        seed = self.rng.randrange(1 << 32)
        started = time.monotonic()
        error = None
        result = RoundResult(scenario, seed)
        try:
            if self.lab is None:
                self.lab = self.new_lab()
            result = run_round(self.lab, scenario, seed)
        except Exception as exc:  # a round that fails is counted and kept, the soak goes on
            error = f"{type(exc).__name__}: {exc}"[:4000]
            traceback.print_exc()
        self.results.append(result)
        elapsed = time.monotonic() - started
        print(
            f"round {number:4d} {scenario:15s} seed {seed:10d} acked {result.acked:6d} "
            f"lost {result.lost:5d} rpo {result.rpo_s:6.3f}s mismatches {len(result.mismatches)} "
            f"{elapsed:5.1f}s{' FAILED' if error else ''}",
            flush=True,
        )
        for note in result.notes:
            print(f"           {note}", flush=True)
        if error or result.mismatches:
            self.keep_failed(number, result, error)

    def keep_failed(self, number: int, result: RoundResult, error: str | None) -> None:
        assert self.lab is not None or error is not None
        if self.lab is not None:
            self.lab.close(clean=False)
            self.lab = None
        kept = {
            "round": number,
            "scenario": result.scenario,
            "seed": result.seed,
            "error": error,
            "mismatches": result.mismatches[:50],
            "data_dir": str(self.lab_dir),
        }
        self.failed.append(kept)
        print(f"           kept for inspection: {self.lab_dir}", flush=True)
        for line in ([error.splitlines()[0]] if error else []) + result.mismatches[:10]:
            print(f"           {line}", flush=True)

    def finish(self) -> None:
        if self.lab is not None:
            self.lab.close(clean=True)
            shutil.rmtree(self.lab_dir, ignore_errors=True)

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        faults = collections.Counter(f for r in self.results for f in r.faults)
        rpos = [r.rpo_s for r in self.results if r.scenario == "disaster" and r.faults]
        lost = [r.lost for r in self.results if r.scenario == "disaster" and r.faults]
        return {
            "seed": self.seed,
            "elapsed_s": round(elapsed_s, 1),
            "rounds": len(self.results),
            "rounds_by_scenario": dict(collections.Counter(r.scenario for r in self.results)),
            "rounds_failed": len(self.failed),
            "faults_injected": sum(faults.values()),
            "faults_by_kind": dict(sorted(faults.items())),
            "writes_acknowledged": sum(r.acked for r in self.results),
            "writes_lost": sum(r.lost for r in self.results),
            "lost_per_disaster_max": max(lost, default=0),
            "rpo_s_max": round(max(rpos, default=0.0), 4),
            "rpo_s_median": round(statistics.median(rpos), 4) if rpos else 0.0,
            "mismatches": sum(len(r.mismatches) for r in self.results),
            "failed": self.failed,
        }


def main() -> int:
    args = parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="journalpair-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: seed {seed}, {args.duration:.0f} s, workdir {workdir}", flush=True)
    soak = Soak(workdir, seed, args.scenarios)
    started = time.monotonic()
    number = 0
    stop = []  # SIGTERM or SIGINT: end after the current round, with the summary

    def request_stop(signum: int, _frame: object) -> None:
        print(f"soak: {signal.Signals(signum).name}: stopping after this round", flush=True)
        stop.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while time.monotonic() - started < args.duration and not stop:
            number += 1
            soak.round(number)
    finally:
        soak.finish()
    summary = soak.summary(time.monotonic() - started)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("summary:", flush=True)
    for key, value in summary.items():
        if key != "failed":
            print(f"  {key}: {value}")
    for failed in summary["failed"]:
        print(f"  FAILED round {failed['round']} ({failed['scenario']}, seed {failed['seed']}):")
        why = failed["error"].splitlines()[0] if failed["error"] else failed["mismatches"][:3]
        print(f"    {why}\n    data: {failed['data_dir']}")
    print(f"  json: {workdir / 'summary.json'}")
    bad = summary["mismatches"] or summary["rounds_failed"]
    print("soak FAILED" if bad else "soak passed: 0 mismatches", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
