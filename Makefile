# journalpair: see README.md. Every target that runs code sets up first (fast when done).
SHELL := /bin/bash
VENV := .venv
BENCH_ARGS ?=

.PHONY: setup test lint run bench clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy common primaryd secondaryd

test: lint
	$(VENV)/bin/pytest

run: setup
	@bash scripts/run.sh

# e.g. make bench BENCH_ARGS='--runtime 5 --only randread-4k-qd32'
bench: setup
	$(VENV)/bin/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build
