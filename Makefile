# journalpair: see README.md. Every target that runs code sets up first (fast when done).
SHELL := /bin/bash
VENV := .venv
BENCH_ARGS ?=
BENCH_ISCSI_ARGS ?=
DURATION ?= 600

.PHONY: setup test lint run bench bench-iscsi soak clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy common primaryd secondaryd

# Two pytest workers: the e2e tests mostly wait on daemons, disks and sockets, so one
# process left the 2 cores half idle (14 min serially). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: lint
	$(VENV)/bin/pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

run: setup
	@bash scripts/run.sh

# fio against journalpair (paired), qemu-nbd and a QEMU mirror, then scripts/bench_pipeline.py;
# one table, one JSON under bench-results/. Shorter: BENCH_ARGS='--runtime 2 --reps 1 --no-pipeline'
bench: setup
	$(VENV)/bin/python scripts/bench.py $(BENCH_ARGS)
	$(MAKE) --no-print-directory bench-iscsi

# our iSCSI target vs Debian's tgt (installed here when tgtd is missing; tgtd needs root):
# iscsi-test-cu side by side, then qemu-img bench / iscsi-perf ratios; ~2 minutes.
# Shorter: BENCH_ISCSI_ARGS='--reps 1'
bench-iscsi: setup
	@command -v tgtd >/dev/null || { echo "installing Debian's tgt" >&2; \
		$$([ $$(id -u) -eq 0 ] || echo sudo) apt-get update -qq && \
		$$([ $$(id -u) -eq 0 ] || echo sudo) apt-get install -y -qq --no-install-recommends tgt >/dev/null; }
	$(VENV)/bin/python scripts/bench_iscsi.py $(BENCH_ISCSI_ARGS)

# the mixed fault scenarios (tests/e2e/disaster.py) in a loop for DURATION (600, 30m, 1h);
# one line a round, then the counts; exit 1 on any mismatch or failed round
soak: setup
	$(VENV)/bin/python scripts/soak.py --duration $(DURATION)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build
