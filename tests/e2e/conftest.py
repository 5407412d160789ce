"""Fixtures for the end-to-end tests: daemons as real processes, logs attached on failure."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.e2e.faultproxy import FaultProxy
from tests.e2e.helpers import Daemon, Daemons

_DAEMONS = pytest.StashKey[Daemons]()


@pytest.fixture
def daemons(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemons]:
    """Start primaryd/secondaryd in tmp_path; at teardown SIGTERM them and require exit 0."""
    factory = Daemons(tmp_path)
    request.node.stash[_DAEMONS] = factory
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def primary(daemons: Daemons) -> Daemon:
    """A primaryd serving one empty 64 MiB volume, vol0."""
    return daemons.start_primary()


@pytest.fixture
def secondary(daemons: Daemons) -> Daemon:
    """A secondaryd (no primary reachable) serving vol0 read-only."""
    return daemons.start_secondary()


@pytest.fixture
def proxied(daemons: Daemons) -> Iterator[list[FaultProxy]]:
    """FaultProxies a test started (helpers.pair_through_proxy); closed before the daemons stop."""
    proxies: list[FaultProxy] = []
    try:
        yield proxies
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On any failure (setup, call or teardown), append every daemon's log to the report."""
    report = yield
    factory = item.stash.get(_DAEMONS, None)
    if report.failed and factory is not None:
        for daemon in factory.started:
            report.sections.append((f"{daemon.name} log: {daemon.log_path}", daemon.log_text()))
    return report
