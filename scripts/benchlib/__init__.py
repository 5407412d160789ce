"""Helpers for scripts/bench.py: servers under test, /proc sampling, a QMP client, the tables."""
