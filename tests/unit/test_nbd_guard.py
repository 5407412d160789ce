"""The nbd: config section, volumes[].read_only, and common.nbd.guard's decisions, with the
clock passed in (no sleeping)."""

from __future__ import annotations

import ipaddress
import struct
import textwrap
from pathlib import Path

import pytest

from common.config import Config, ConfigError, NbdConfig, load_config
from common.nbd import constants as c
from common.nbd.guard import ClientWatch, LogLimiter, refusal
from common.nbd.protocol import NEED_DATA, ExportChosen, ExportInfo, NbdServerConnection

REPO = Path(__file__).resolve().parents[2]

BASE = """\
role: {role}
group: jg0
data_dir: data
listen:
  nbd: 127.0.0.1:10809
  replication: 127.0.0.1:7410
primary: 127.0.0.1:7411
control: ctl.sock
journal:
  capacity: 64MiB
volumes:
  - {{name: vol0, path: vol0.img, size: 1MiB}}
  - {{name: vol1, path: vol1.img, size: 1MiB, read_only: {read_only}}}
"""


def load(tmp_path: Path, extra: str = "", role: str = "primary", read_only: str = "true") -> Config:
    path = tmp_path / "jp.yaml"
    path.write_text(BASE.format(role=role, read_only=read_only) + textwrap.dedent(extra))
    return load_config(path)


def error_of(tmp_path: Path, extra: str = "", read_only: str = "true") -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra, read_only=read_only)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_nbd_section_is_optional_with_defaults_and_read_only_defaults_false(
    tmp_path: Path, role: str
) -> None:
    config = load(tmp_path, role=role)
    assert config.nbd == NbdConfig()
    assert config.nbd.max_connections == 128
    assert config.nbd.memory_limit == 512 << 20
    assert config.nbd.allow is None
    assert [v.read_only for v in config.volumes] == [False, True]


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_nbd_section_parses_for_both_roles(tmp_path: Path, role: str) -> None:
    extra = """\
    nbd:
      max_connections: 7
      handshake_timeout_s: 2.5
      stall_timeout_s: 1
      allow: [127.0.0.1, 10.0.0.0/24, "::1", "fd00::/64"]
      memory_limit: 1GiB
    """
    config = load(tmp_path, extra, role=role)
    assert config.nbd == NbdConfig(
        max_connections=7,
        handshake_timeout_s=2.5,
        stall_timeout_s=1.0,
        memory_limit=1 << 30,
        allow=(
            ipaddress.ip_network("127.0.0.1/32"),
            ipaddress.ip_network("10.0.0.0/24"),
            ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("fd00::/64"),
        ),
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("nbd: {max_connections: 0}", "nbd.max_connections: must be 1..1048576, got 0"),
        ("nbd: {max_connections: 2.5}", "nbd.max_connections: expected an integer, got number"),
        ("nbd: {max_connections: true}", "nbd.max_connections: expected an integer, got boolean"),
        ("nbd: {handshake_timeout_s: 0}", "nbd.handshake_timeout_s: must be a positive number"),
        ("nbd: {stall_timeout_s: 30s}", "nbd.stall_timeout_s: expected a number of seconds"),
        ("nbd: {allow: []}", "nbd.allow: empty list admits nobody"),
        ("nbd: {allow: 127.0.0.1}", "nbd.allow: expected a list of addresses or networks"),
        ("nbd: {allow: [10.0.0.1/24]}", "nbd.allow[0]: bad address or network '10.0.0.1/24'"),
        ("nbd: {allow: [127.0.0.1, nowhere]}", "nbd.allow[1]: bad address or network"),
        ("nbd: {allow: [12]}", "nbd.allow[0]: expected a string, got integer"),
        ("nbd: {tls: require}", "nbd.tls: expected a mapping, got string"),
        ("nbd: {tsl: {}}", "nbd.tsl: unknown key"),
        ("nbd: []", "nbd: expected a mapping, got list"),
        ("nbd: {memory_limit: 32MiB}", "nbd.memory_limit: must be at least 64MiB (67108864)"),
        ("nbd: {memory_limit: 1GB}", "nbd.memory_limit: bad size '1GB'"),
        ("nbd: {memory_limit: -1}", "nbd.memory_limit: bad size -1"),
        (
            "nbd: {memory_limit: 64MiB, max_connections: 1024}",
            "nbd.memory_limit: 67108864 is less than 128KiB per connection; "
            "nbd.max_connections 1024 needs at least 134217728",
        ),
    ],
)
def test_nbd_errors_name_the_key(tmp_path: Path, extra: str, expected: str) -> None:
    assert error_of(tmp_path, extra + "\n").startswith(expected)


def test_volume_read_only_must_be_a_boolean(tmp_path: Path) -> None:
    message = error_of(tmp_path, read_only='"yes"')
    assert message.startswith("volumes[1].read_only: expected true or false"), message


@pytest.mark.parametrize("name", ["primary.yaml", "secondary.yaml"])
def test_shipped_nbd_section_shows_the_defaults(name: str) -> None:
    assert load_config(REPO / "configs" / name).nbd == NbdConfig()


# --- admission --------------------------------------------------------------------------------

LOCAL = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("fd00::/64"))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("::ffff:127.0.0.1", True),  # a dual-stack listener's view of an IPv4 client
        ("fd00::5", True),
        ("fd01::5", False),
        ("fe80::1%eth0", False),
        ("not-an-address", False),
    ],
)
def test_allow_list_admits_only_listed_addresses(host: str, allowed: bool) -> None:
    why = refusal(host, 0, 10, LOCAL)
    assert (why is None) is allowed, why
    if not allowed:
        assert why == "address not in nbd.allow"


def test_no_allow_list_admits_everyone_up_to_max_connections() -> None:
    assert refusal("192.0.2.7", 9, 10, None) is None
    assert refusal("192.0.2.7", 10, 10, None) == "nbd.max_connections (10) reached"


# --- deadlines --------------------------------------------------------------------------------


def test_handshake_deadline_runs_from_accept_whatever_the_client_sends() -> None:
    watch = ClientWatch(100.0, handshake_timeout_s=10, stall_timeout_s=30)
    for now, progress in ((101, 1), (105, 2), (109.9, 3)):
        assert watch.overdue(now, handshaking=True, busy=True, progress=progress) is None
    why = watch.overdue(110.0, handshaking=True, busy=True, progress=4)
    assert why == "no handshake within 10 s"


def test_idle_client_is_never_overdue() -> None:
    watch = ClientWatch(0.0, handshake_timeout_s=1, stall_timeout_s=1)
    for now in (2.0, 100.0, 86400.0):
        assert watch.overdue(now, handshaking=False, busy=False, progress=0) is None


def test_busy_client_without_progress_is_overdue_after_the_stall_timeout() -> None:
    watch = ClientWatch(0.0, handshake_timeout_s=1, stall_timeout_s=5)
    assert watch.overdue(10.0, handshaking=False, busy=True, progress=7) is None
    assert watch.overdue(14.9, handshaking=False, busy=True, progress=7) is None
    assert watch.overdue(15.0, handshaking=False, busy=True, progress=7) == (
        "stalled mid-request for 5 s"
    )


def test_progress_or_idleness_restarts_the_stall_clock() -> None:
    watch = ClientWatch(0.0, handshake_timeout_s=1, stall_timeout_s=5)
    assert watch.overdue(10.0, handshaking=False, busy=True, progress=1) is None
    assert watch.overdue(14.0, handshaking=False, busy=True, progress=2) is None  # moved
    assert watch.overdue(18.0, handshaking=False, busy=True, progress=2) is None
    assert watch.overdue(18.5, handshaking=False, busy=False, progress=2) is None  # idle
    assert watch.overdue(22.0, handshaking=False, busy=True, progress=2) is None  # busy again
    assert watch.overdue(27.0, handshaking=False, busy=True, progress=2) is not None


# --- log limiting -----------------------------------------------------------------------------


def test_log_limiter_logs_a_burst_then_counts_then_summarises_once() -> None:
    limiter = LogLimiter(burst=3, interval_s=10)
    logged = [limiter.allow(0.001 * i) for i in range(10_000)]
    assert logged[:3] == [True] * 3
    assert not any(logged[3:])
    assert limiter.summary(5.0) == 0  # the interval is not over yet
    assert limiter.summary(10.0) == 9_997
    assert limiter.summary(20.0) == 0
    assert limiter.allow(30.0)  # a new interval: full lines again


# --- memory per connection --------------------------------------------------------------------


def test_a_connection_that_has_not_finished_its_handshake_holds_a_small_buffer() -> None:
    """A flood of connections that never handshake costs 4 KiB each, not the 256 KiB a
    connection in transmission keeps for in-place WRITE payloads."""
    core = NbdServerConnection({"vol0": ExportInfo("vol0", 1 << 20, read_only=False)})
    assert len(core.get_buffer()) <= 4096
    core.receive_data(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    assert core.next_event() is NEED_DATA
    assert len(core.get_buffer()) <= 4096
    core.receive_data(struct.pack(">QII", c.IHAVEOPT, c.Opt.EXPORT_NAME, 4) + b"vol0")
    assert isinstance(core.next_event(), ExportChosen)
    assert len(core.get_buffer()) >= 64 << 10  # transmission: room for big requests again
