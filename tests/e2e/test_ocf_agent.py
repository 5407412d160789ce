"""deploy/ocf/journalpair: the OCF agent's actions against real daemons, as Pacemaker runs them.

    test ── agent ACTION (env: OCF_RESKEY_config, bindir, state_dir, log_file) ──► exit code
              start:   setsid primaryd/secondaryd &  ── pid file ── until pairctl answers
              monitor: pid ── pairctl display --json ── 0 / 8 (promoted) / 7 (stopped)
              promote: pairctl takeover ── 1 swap, 2 SSWS ── until display shows it
    the pair state after each action: pairctl display on both sites

The agent runs without Pacemaker here (an empty OCF_ROOT: it defines the OCF codes itself);
ocf-tester, from Debian's resource-agents, runs it with Pacemaker's ocf-shellfuncs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.disaster import prepare_swappable_sites
from tests.e2e.helpers import (
    DAEMON_BIN_DIR,
    Daemon,
    Daemons,
    MiB,
    create_pair,
    display,
    format_result,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

AGENT = Path(__file__).resolve().parents[2] / "deploy" / "ocf" / "journalpair"
AGENT_TIMEOUT_S = 90.0
OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED = 0, 1, 5, 6
OCF_NOT_RUNNING, OCF_RUNNING_PROMOTED = 7, 8
SMALL_VOLUME = (("vol0", 8 * MiB),)
ACTIONS = {"start", "stop", "monitor", "promote", "demote", "validate-all", "meta-data"}


@dataclass
class Agent:
    """The agent managing one site, as Pacemaker would call it for a clone instance."""

    daemon: Daemon
    state_dir: Path
    ocf_root: Path  # empty: no ocf-shellfuncs

    def env(self, **params: str) -> dict[str, str]:
        resource = {
            "config": os.fspath(self.daemon.config_path),
            "bindir": os.fspath(DAEMON_BIN_DIR),
            "state_dir": os.fspath(self.state_dir),
            "log_file": os.fspath(self.daemon.log_path),
            **params,
        }
        return {
            **os.environ,
            "OCF_ROOT": os.fspath(self.ocf_root),
            "OCF_RESOURCE_INSTANCE": f"jp-{self.daemon.name}",
            "OCF_RESKEY_CRM_meta_timeout": "60000",
            **{f"OCF_RESKEY_{key}": value for key, value in resource.items()},
        }

    def run(self, action: str, **params: str) -> subprocess.CompletedProcess[str]:
        argv = [os.fspath(AGENT), action]
        try:
            return subprocess.run(
                argv,
                env=self.env(**params),
                capture_output=True,
                text=True,
                timeout=AGENT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent {action} hung ({AGENT_TIMEOUT_S} s)") from None

    def expect(self, action: str, code: int) -> subprocess.CompletedProcess[str]:
        proc = self.run(action)
        assert proc.returncode == code, (
            f"{self.daemon.name}: {action} should exit {code}\n"
            + format_result([os.fspath(AGENT), action], proc.returncode, proc.stdout, proc.stderr)
        )
        return proc

    def pid(self) -> int:
        return int((self.state_dir / f"journalpair-jp-{self.daemon.name}.pid").read_text())


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie has none
    except FileNotFoundError:
        return False


@pytest.fixture
def agents(daemons: Daemons, tmp_path: Path) -> Iterator[list[Agent]]:
    """Agents made by agent_for(); at teardown each stops its daemon (exit 0 required)."""
    made: list[Agent] = []
    try:
        yield made
    finally:
        problems = []
        for agent in reversed(made):
            proc = agent.run("stop")
            if proc.returncode != OCF_SUCCESS:
                problems.append(f"{agent.daemon.name}: stop exited {proc.returncode}")
                pid_file = agent.state_dir / f"journalpair-jp-{agent.daemon.name}.pid"
                if pid_file.exists() and pid_alive(agent.pid()):
                    os.kill(agent.pid(), signal.SIGKILL)
        assert not problems, problems


def agent_for(agents: list[Agent], daemon: Daemon, tmp_path: Path) -> Agent:
    ocf_root = tmp_path / "no-pacemaker"
    ocf_root.mkdir(exist_ok=True)
    agent = Agent(daemon, tmp_path / "agent-state", ocf_root)
    agents.append(agent)
    return agent


def pair_sites(daemons: Daemons, agents: list[Agent], tmp_path: Path) -> tuple[Agent, Agent]:
    """Site A (primary) and site B (secondary), each able to take the other role (both
    replication addresses in both configs), each started by its agent, link up."""
    a, b = prepare_swappable_sites(daemons, SMALL_VOLUME)
    primary, secondary = agent_for(agents, a, tmp_path), agent_for(agents, b, tmp_path)
    primary.expect("start", OCF_SUCCESS)
    secondary.expect("start", OCF_SUCCESS)
    wait_until(lambda: display(primary.daemon)["link"]["up"], 15, "the secondary to connect")
    return primary, secondary


def test_meta_data_is_ocf_xml_naming_every_action(tmp_path: Path) -> None:
    proc = subprocess.run(
        [os.fspath(AGENT), "meta-data"],
        env={**os.environ, "OCF_ROOT": os.fspath(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    root = ET.fromstring(proc.stdout)
    assert root.tag == "resource-agent" and root.get("name") == "journalpair"
    assert {action.get("name") for action in root.iter("action")} == ACTIONS
    assert all(action.get("timeout") for action in root.iter("action"))
    roles = {action.get("role") for action in root.iter("action") if action.get("role")}
    assert roles == {"Promoted", "Unpromoted"}
    params = {param.get("name"): param for param in root.iter("parameter")}
    assert {"config", "bindir", "pairctl", "daemon"} <= set(params)
    assert params["config"].get("required") == "1"
    dtd = Path("/usr/share/resource-agents/ra-api-1.dtd")  # resource-agents, from make setup
    lint = subprocess.run(
        ["xmllint", "--noout", "--dtdvalid", os.fspath(dtd), "-"],
        input=proc.stdout,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert lint.returncode == 0, lint.stderr


def test_start_monitor_stop_a_primary_and_a_secondary(
    daemons: Daemons, agents: list[Agent], tmp_path: Path
) -> None:
    primary = agent_for(agents, daemons.prepare("primary", SMALL_VOLUME), tmp_path)
    secondary = agent_for(
        agents,
        daemons.prepare("secondary", SMALL_VOLUME, primary_port=primary.daemon.peer_port),
        tmp_path,
    )
    primary.expect("monitor", OCF_NOT_RUNNING)  # a probe before anything ran
    primary.expect("validate-all", OCF_SUCCESS)

    primary.expect("start", OCF_SUCCESS)
    assert display(primary.daemon)["role"] == "primary"  # pairctl answers once start returns
    primary.expect("monitor", OCF_SUCCESS)  # started is unpromoted, until Pacemaker promotes
    primary.expect("promote", OCF_SUCCESS)
    primary.expect("monitor", OCF_RUNNING_PROMOTED)

    secondary.expect("start", OCF_SUCCESS)
    secondary.expect("monitor", OCF_SUCCESS)
    wait_until(lambda: display(primary.daemon)["link"]["up"], 15, "the secondary to connect")
    assert display(secondary.daemon)["role"] == "secondary"

    pids = primary.pid(), secondary.pid()
    primary.expect("start", OCF_SUCCESS)  # starting a started site changes nothing
    secondary.expect("start", OCF_SUCCESS)
    assert (primary.pid(), secondary.pid()) == pids
    primary.expect("monitor", OCF_RUNNING_PROMOTED)

    for agent, pid in zip((secondary, primary), reversed(pids), strict=True):
        agent.expect("stop", OCF_SUCCESS)
        assert not pid_alive(pid)
        assert agent.daemon.log_text().rstrip().endswith("stopped")  # SIGTERM: graceful
        agent.expect("monitor", OCF_NOT_RUNNING)
        agent.expect("stop", OCF_SUCCESS)  # stopping a stopped site succeeds


def test_promote_the_secondary_while_the_primary_answers_swaps_the_roles(
    daemons: Daemons, agents: list[Agent], tmp_path: Path
) -> None:
    primary, secondary = pair_sites(daemons, agents, tmp_path)
    primary.expect("promote", OCF_SUCCESS)
    create_pair(primary.daemon, secondary.daemon)
    pid = secondary.pid()

    # Pacemaker moving the promoted role: demote here, then promote there.
    primary.expect("demote", OCF_SUCCESS)
    primary.expect("monitor", OCF_SUCCESS)  # held unpromoted; still serving its hosts
    assert display(primary.daemon)["role"] == "primary"
    promote = secondary.expect("promote", OCF_SUCCESS)
    assert "takeover exited 1" in promote.stderr  # horctakeover's 1: a swap

    assert display(secondary.daemon)["role"] == "primary"
    assert secondary.pid() == pid  # the same process, exec'ed as primaryd
    secondary.expect("monitor", OCF_RUNNING_PROMOTED)
    wait_until(
        lambda: display(primary.daemon)["role"] == "secondary", 30, "the old primary to follow"
    )
    primary.expect("monitor", OCF_SUCCESS)
    primary.expect("demote", OCF_SUCCESS)  # a secondary is unpromoted already
    secondary.expect("promote", OCF_SUCCESS)  # promoting a promoted site changes nothing
    assert display(secondary.daemon)["role"] == "primary"


def test_promote_the_secondary_with_the_primary_killed_gives_ssws(
    daemons: Daemons, agents: list[Agent], tmp_path: Path
) -> None:
    primary, secondary = pair_sites(daemons, agents, tmp_path)
    create_pair(primary.daemon, secondary.daemon)
    os.kill(primary.pid(), signal.SIGKILL)  # the primary site is lost
    wait_until(lambda: not pid_alive(primary.pid()), 10, "the primary to die")
    primary.expect("monitor", OCF_NOT_RUNNING)

    promote = secondary.expect("promote", OCF_SUCCESS)
    assert "takeover exited 2" in promote.stderr  # horctakeover's 2: S-VOL takeover
    shown = display(secondary.daemon)
    assert (shown["role"], shown["state"]) == ("secondary", "SSWS")
    secondary.expect("monitor", OCF_RUNNING_PROMOTED)

    secondary.expect("demote", OCF_SUCCESS)  # cannot step down: held unpromoted
    secondary.expect("monitor", OCF_SUCCESS)
    assert display(secondary.daemon)["state"] == "SSWS"
    secondary.expect("promote", OCF_SUCCESS)
    secondary.expect("monitor", OCF_RUNNING_PROMOTED)
    primary.expect("stop", OCF_SUCCESS)  # its process is gone: nothing to stop


def test_promote_is_refused_before_a_complete_copy(
    daemons: Daemons, agents: list[Agent], tmp_path: Path
) -> None:
    _, secondary = pair_sites(daemons, agents, tmp_path)  # SMPL: never copied
    promote = secondary.expect("promote", OCF_ERR_GENERIC)
    assert "cannot takeover" in promote.stderr
    assert display(secondary.daemon)["role"] == "secondary"
    secondary.expect("monitor", OCF_SUCCESS)


def test_validate_all_names_what_is_wrong(
    daemons: Daemons, agents: list[Agent], tmp_path: Path
) -> None:
    agent = agent_for(agents, daemons.prepare("primary", SMALL_VOLUME), tmp_path)
    missing = agent.run("validate-all", config=os.fspath(tmp_path / "nope.yaml"))
    assert missing.returncode == OCF_ERR_CONFIGURED
    assert "nope.yaml: not a readable file" in missing.stderr
    no_programs = agent.run("validate-all", bindir=os.fspath(tmp_path))
    assert no_programs.returncode == OCF_ERR_INSTALLED
    assert f"{tmp_path}/pairctl: not an executable program" in no_programs.stderr
    assert agent.run("start", bindir=os.fspath(tmp_path)).returncode == OCF_ERR_INSTALLED


def test_ocf_tester_passes_on_a_primary_site(daemons: Daemons, tmp_path: Path) -> None:
    """Debian's ocf-tester (resource-agents) drives every action, with ocf-shellfuncs."""
    site = daemons.prepare("primary", SMALL_VOLUME)
    state_dir = tmp_path / "agent-state"
    params = {
        "config": site.config_path,
        "bindir": DAEMON_BIN_DIR,
        "state_dir": state_dir,
        "log_file": site.log_path,
    }
    argv = ["ocf-tester", "-n", "jp-tester"]
    for key, value in params.items():
        argv += ["-o", f"{key}={value}"]
    argv.append(os.fspath(AGENT))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=100, check=False)
    finally:
        Agent(site, state_dir, Path("/usr/lib/ocf")).run("stop")  # whatever ocf-tester left
    report = format_result(argv, proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 0, report
    assert f"{AGENT} passed all tests" in proc.stdout, report
