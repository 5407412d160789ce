"""Load and validate a daemon's YAML config (the "Config" contract in ARCHITECTURE.md).

    load_config(FILE) ── read (size-limited) ── yaml.safe_load ── top level a mapping?
        │
        └─ role first (it decides which keys are allowed), then every table in _TOP_KEYS:
           unknown key / missing key / wrong type / bad value ── ConfigError("key.path: why")
        │
        └─ cross-key checks (duplicate volume names and paths, clashing listen addresses)
    check_volume_files(config): stat every volume path, create nothing, raise on the first clash

Every error is one ConfigError line that starts with the key path (``volumes[1].size: ...``) or,
for problems with the file itself, the file name. The daemons call both functions before they
create, open or bind anything, so a bad config never touches disk or ports.

The schema is data: each section is a table of YAML key -> _Key (parser, Config field, required,
default, roles). To add a key (as ``pair.path_watch_s`` was), add a row to the table and the
field to the dataclass it fills.

Relative paths (data_dir, control, volumes[].path, and a pair.hook executable given with a
slash) are resolved against the directory holding the config file, not the daemon's working
directory, so a config means the same wherever the daemon is started from.

Optional sections (``pair``, ``link``, ``nbd``, ``iscsi``, ``metrics``, ``log``) take their
dataclass's defaults when absent, so Config.pair, Config.link, Config.nbd, Config.iscsi,
Config.metrics and Config.log are always there.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import yaml

from common.iscsi.chap import MAX_NAME_CHARS as CHAP_USER_MAX_CHARS
from common.logsetup import LEVELS, LOG_FORMATS

__all__ = [
    "Address",
    "Config",
    "ConfigError",
    "IscsiConfig",
    "JournalConfig",
    "LogConfig",
    "MetricsConfig",
    "NbdConfig",
    "PairConfig",
    "Role",
    "VolumeConfig",
    "check_volume_files",
    "load_config",
    "parse_address",
    "parse_size",
]

Role = Literal["primary", "secondary"]
ROLES: tuple[Role, ...] = ("primary", "secondary")

SECTOR_BYTES = 512
JOURNAL_CAPACITY_MIN_BYTES = 1 << 20
# Sizes end up as file offsets (off_t); anything larger is a typo, not a volume.
SIZE_MAX_BYTES = (1 << 63) - 1
# A config is a screenful of YAML; refuse to parse something that is clearly not one.
CONFIG_FILE_MAX_BYTES = 1 << 20
# sun_path is 108 bytes on Linux, including the terminating NUL.
CONTROL_PATH_MAX_BYTES = 107

_SIZE_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"([0-9]+) ?(KiB|MiB|GiB|TiB)?")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}")
_IPV4ISH_RE = re.compile(r"[0-9.]+")


class ConfigError(Exception):
    """A config problem, as one line naming the key path (or the file) and what is wrong."""


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class VolumeConfig:
    name: str
    path: Path
    size: int
    # Hosts may only read it over NBD, in every state and on both sites (replication still
    # writes the S-VOL).
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class JournalConfig:
    capacity: int


PATH_WATCH_DEFAULT_S = 30.0
OVERFLOW_WATCH_DEFAULT_S = 60.0  # HUR's data overflow watch default
BITMAP_REGION_DEFAULT_BYTES = 64 << 10  # common.bitmap.REGION_BYTES_DEFAULT
BITMAP_REGION_MIN_BYTES = 4 << 10
HOOK_TIMEOUT_DEFAULT_S = 30.0
SECONDS_MAX = 10**9  # about 31 years: any duration beyond is a typo


@dataclass(frozen=True, slots=True)
class PairConfig:
    """The optional ``pair:`` section: link-loss handling and the transition hook."""

    # How long the primary tolerates no READ_JOURNAL before it suspends the pair (PSUE).
    path_watch_s: float = PATH_WATCH_DEFAULT_S
    # How long the journal may stay over the high-water mark (PFUL) before the pair suspends
    # (PFUS), rather than wait to be full.
    overflow_watch_s: float = OVERFLOW_WATCH_DEFAULT_S
    # Bytes per difference-bitmap bit: smaller copies less after a split, costs more memory.
    bitmap_region: int = BITMAP_REGION_DEFAULT_BYTES
    # Resync by itself when the link is back after a PSUE caused by a link failure.
    auto_resync: bool = False
    # Lag in seconds (lag.seconds) over which the primary emits an rpo_exceeded event;
    # None: not watched.
    rpo_target_s: float | None = None
    # HUR's inflow control: over rpo_target_s, delay host write replies a little (bounded).
    inflow_control: bool = False
    # argv of the command run on every pair state transition; () when there is none.
    hook: tuple[str, ...] = ()
    hook_timeout_s: float = HOOK_TIMEOUT_DEFAULT_S


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """The optional ``link:`` section: authentication and encryption of the replication link
    (the same on both sites; common.linksecurity turns it into a secret and TLS contexts)."""

    # A file holding the shared secret (at least 16 bytes, mode 0600): HMAC challenge-response.
    secret_file: Path | None = None
    # TLS with mutual verification: this site's certificate and key, and the CA that signed
    # the other site's certificate.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Listen for replication on a non-loopback address with neither of the above.
    allow_insecure: bool = False

    @property
    def authenticated(self) -> bool:
        return self.secret_file is not None or self.tls_cert is not None


NBD_MAX_CONNECTIONS_DEFAULT = 128
NBD_MAX_CONNECTIONS_MAX = 1 << 20
NBD_HANDSHAKE_TIMEOUT_DEFAULT_S = 10.0
NBD_STALL_TIMEOUT_DEFAULT_S = 30.0
NBD_ALLOW_MAX = 1024
NBD_MEMORY_LIMIT_DEFAULT_BYTES = 512 << 20
# The pool (half the limit) must take one largest WRITE (32 MiB, common.nbd.constants).
NBD_MEMORY_LIMIT_MIN_BYTES = 64 << 20
# Each connection's own share is half of this: room for a QD32 burst of 4 KiB replies.
NBD_MEMORY_PER_CONNECTION_MIN_BYTES = 128 << 10

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NbdTlsMode = Literal["require", "optional"]
NBD_TLS_MODES: tuple[NbdTlsMode, ...] = ("require", "optional")


@dataclass(frozen=True, slots=True)
class NbdConfig:
    """The optional ``nbd:`` section: which clients the NBD server admits, how long it
    waits for one, and TLS (the same keys on both roles: a secondary serves hosts after a
    takeover; common.nbd.tls turns the tls_* fields into a server context)."""

    # Connections served at once; one more is closed as soon as it is accepted.
    max_connections: int = NBD_MAX_CONNECTIONS_DEFAULT
    # From accept to the end of the option haggling (NBD_OPT_GO / EXPORT_NAME).
    handshake_timeout_s: float = NBD_HANDSHAKE_TIMEOUT_DEFAULT_S
    # How long a client may sit mid-request (part of a header or of a write payload) or not
    # read the replies owed to it; a client with nothing in flight may idle for ever.
    stall_timeout_s: float = NBD_STALL_TIMEOUT_DEFAULT_S
    # Client networks admitted; None admits every address.
    allow: tuple[IpNetwork, ...] | None = None
    # TLS (NBD_OPT_STARTTLS): this server's certificate and key; with tls_ca, clients must
    # present a certificate signed by it.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # require: every option but STARTTLS and ABORT is refused until TLS is up (the spec's
    # FORCEDTLS); optional: a client may start TLS or not.
    tls_mode: NbdTlsMode = "require"
    # Bytes all connections together may hold in replies not yet taken by their clients and
    # in WRITE payloads beyond the standard receive buffer (common.nbd.budget): a connection
    # past its share stops being read while the rest is taken.
    memory_limit: int = NBD_MEMORY_LIMIT_DEFAULT_BYTES

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


ISCSI_MAX_CONNECTIONS_DEFAULT = 16
ISCSI_MAX_CONNECTIONS_MAX = 1024
ISCSI_NAME_MAX_BYTES = 223  # RFC 7143 6.2.1
# RFC 7143 4.2.7.2: iqn.yyyy-mm.reversed.domain[:anything]; names are compared as given, and
# initiators send them lowercased (RFC 3722), so only lowercase ASCII is accepted here.
_IQN_RE = re.compile(
    r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9][a-z0-9-]*(\.[a-z0-9-]+)*(:[a-z0-9.:-]+)?"
)
_EUI_RE = re.compile(r"eui\.[0-9A-F]{16}")  # RFC 7143 4.2.7.3: 16 hex digits, upper case
ISCSI_IQN_PREFIX = "iqn.2026-01.org.journalpair:"


def default_iscsi_iqn(group: str) -> str:
    """The target name when iscsi.iqn is not set: one per group. A group name may hold
    '_' and capitals, which iSCSI names may not: lowercased, '_' becomes '-'."""
    return ISCSI_IQN_PREFIX + group.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class IscsiConfig:
    """The optional ``iscsi:`` section: one target per group, one LUN per volume (LUN n is
    volumes[n]), served with the same journal path as NBD (both roles: a secondary serves
    its S-VOLs read-only, and read-write after a takeover)."""

    # None: no iSCSI server.
    listen: Address | None = None
    # The target name; "": Config.iscsi_iqn derives it from the group.
    iqn: str = ""
    # Connections served at once; one more is closed as soon as it is accepted.
    max_connections: int = ISCSI_MAX_CONNECTIONS_DEFAULT
    # iscsi.chap: every login (discovery too) must pass CHAP as chap_user with the secret in
    # chap_secret_file (common.iscsi.credentials reads it); the mutual pair is what the
    # target answers an initiator that challenges it. None: no CHAP.
    chap_user: str | None = None
    chap_secret_file: Path | None = None
    chap_mutual_user: str | None = None
    chap_mutual_secret_file: Path | None = None
    # Serve beyond loopback without CHAP (an isolated SAN): refused unless this is true.
    allow_insecure: bool = False

    @property
    def exposed_without_chap(self) -> bool:
        """Any host that reaches iscsi.listen may read and write every LUN."""
        listen = self.listen
        return listen is not None and self.chap_user is None and not _is_loopback(listen.host)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The optional ``metrics:`` section: where Prometheus scrapes /metrics (both roles; the
    server is started again by the role a swap switches to)."""

    # None: no metrics server, and the NBD server keeps no per-request statistics.
    listen: Address | None = None


@dataclass(frozen=True, slots=True)
class LogConfig:
    """The optional ``log:`` section (common.logsetup): line format and level."""

    format: str = "text"  # text | logfmt | json
    level: str = "info"  # debug | info | warning | error


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    role: Role
    group: str
    data_dir: Path
    nbd_listen: Address
    replication_listen: Address | None
    primary: Address | None
    control: Path
    journal: JournalConfig
    volumes: tuple[VolumeConfig, ...]
    pair: PairConfig = PairConfig()
    link: LinkConfig = LinkConfig()
    nbd: NbdConfig = NbdConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    iscsi: IscsiConfig = IscsiConfig()

    @property
    def iscsi_iqn(self) -> str:
        """The iSCSI target name: iscsi.iqn, or one derived from the group."""
        return self.iscsi.iqn or default_iscsi_iqn(self.group)


# --- value parsers --------------------------------------------------------------------------


def _type_name(value: object) -> str:
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string"}
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return names.get(type(value), type(value).__name__)


def _expect_str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_type_name(value)}")
    return value


def parse_size(value: object, key: str) -> int:
    """Bytes from an int, or a string of digits with an optional KiB/MiB/GiB/TiB suffix."""
    hint = "(use bytes or a number with KiB/MiB/GiB/TiB)"
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value)):
        size = int(match[1]) * _SIZE_UNITS[match[2] or ""]
    else:
        raise ConfigError(f"{key}: bad size {value!r} {hint}")
    if size < 0:
        raise ConfigError(f"{key}: bad size {value!r} {hint}")
    if size > SIZE_MAX_BYTES:
        raise ConfigError(f"{key}: size {value!r} is too large (max {SIZE_MAX_BYTES} bytes)")
    return size


def parse_address(value: object, key: str) -> Address:
    """host:port, [ipv6]:port; port 0..65535 (0: bind any free port)."""
    bad = ConfigError(f"{key}: bad address {value!r} (want host:port)")
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 10:30 as the base-60 number 630.
        raise ConfigError(f"{key}: bad address {value!r} (want host:port; quote it in YAML)")
    if not isinstance(value, str):
        raise bad
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep or not _is_ipv6(host):
            raise bad
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not _is_host(host):
            raise bad
    if not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ConfigError(f"{key}: bad port in {value!r} (want 0..65535)")
    return Address(host, int(port))


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _is_host(host: str) -> bool:
    """An IPv4 address or a host name (no ':': an IPv6 address needs brackets)."""
    if _IPV4ISH_RE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return _HOSTNAME_RE.fullmatch(host) is not None


def _parse_role(value: object, key: str) -> Role:
    if value not in ROLES:
        raise ConfigError(f"{key}: must be primary or secondary, got {value!r}")
    return value


def _parse_name(value: object, key: str) -> str:
    """A group or volume name: it becomes an NBD export name and part of file names."""
    name = _expect_str(value, key)
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{key}: bad name {name!r} (use 1-64 of A-Z a-z 0-9 _ . -)")
    return name


def _parse_volume_size(value: object, key: str) -> int:
    size = parse_size(value, key)
    if size <= 0 or size % SECTOR_BYTES:
        raise ConfigError(f"{key}: must be a positive multiple of {SECTOR_BYTES}, got {size}")
    return size


def _parse_seconds(value: object, key: str) -> float:
    """A duration in seconds: a positive, finite int or float (a bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number of seconds, got {_type_name(value)}")
    if isinstance(value, int) and value > SECONDS_MAX:
        raise ConfigError(f"{key}: {value} seconds is more than {SECONDS_MAX}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _parse_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_type_name(value)} {value!r}")
    return value


def _parse_max_connections(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {_type_name(value)}")
    if not 1 <= value <= NBD_MAX_CONNECTIONS_MAX:
        raise ConfigError(f"{key}: must be 1..{NBD_MAX_CONNECTIONS_MAX}, got {value}")
    return value


def _parse_allow(value: object, key: str) -> tuple[IpNetwork, ...]:
    """Addresses (``10.0.0.5``, ``::1``) and networks (``10.0.0.0/24``, ``fd00::/64``)."""
    if not isinstance(value, list):
        raise ConfigError(
            f"{key}: expected a list of addresses or networks, got {_type_name(value)}"
        )
    if not value:
        raise ConfigError(f"{key}: empty list admits nobody (leave the key out to admit everyone)")
    if len(value) > NBD_ALLOW_MAX:
        raise ConfigError(f"{key}: more than {NBD_ALLOW_MAX} entries")
    networks: list[IpNetwork] = []
    for index, item in enumerate(value):
        text = _expect_str(item, f"{key}[{index}]")
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ConfigError(f"{key}[{index}]: bad address or network {text!r}: {exc}") from None
    return tuple(networks)


def _parse_iscsi_max_connections(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {_type_name(value)}")
    if not 1 <= value <= ISCSI_MAX_CONNECTIONS_MAX:
        raise ConfigError(f"{key}: must be 1..{ISCSI_MAX_CONNECTIONS_MAX}, got {value}")
    return value


def _parse_iscsi_name(value: object, key: str) -> str:
    name = _expect_str(value, key)
    if len(name.encode()) > ISCSI_NAME_MAX_BYTES:
        raise ConfigError(f"{key}: longer than {ISCSI_NAME_MAX_BYTES} bytes")
    if not (_IQN_RE.fullmatch(name) or _EUI_RE.fullmatch(name)):
        raise ConfigError(
            f"{key}: bad iSCSI name {name!r} (want iqn.YYYY-MM.reversed.domain[:name], "
            "lowercase a-z 0-9 . - :, or eui. and 16 upper-case hex digits)"
        )
    return name


def _parse_chap_user(value: object, key: str) -> str:
    """A CHAP name (CHAP_N): 1..255 characters, no control characters."""
    user = _expect_str(value, key)
    if not 1 <= len(user) <= CHAP_USER_MAX_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in user):
        raise ConfigError(
            f"{key}: bad CHAP user {user!r} (1-255 characters, no control characters)"
        )
    return user


def _parse_nbd_tls_mode(value: object, key: str) -> NbdTlsMode:
    if value not in NBD_TLS_MODES:
        raise ConfigError(f"{key}: must be require or optional, got {value!r}")
    return value


def _choice(allowed: tuple[str, ...]) -> Callable[[object, str], str]:
    """One of ``allowed`` (a string)."""

    def parse(value: object, key: str) -> str:
        if value not in allowed:
            choices = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
            raise ConfigError(f"{key}: must be {choices}, got {value!r}")
        return value

    return parse


def _parse_seconds_or_null(value: object, key: str) -> float | None:
    return None if value is None else _parse_seconds(value, key)


def _parse_bitmap_region(value: object, key: str) -> int:
    region = parse_size(value, key)
    if region < BITMAP_REGION_MIN_BYTES or region & (region - 1):
        raise ConfigError(f"{key}: must be a power of two of at least 4KiB, got {region}")
    return region


def _size_at_least(minimum: int, shown: str) -> Callable[[object, str], int]:
    """A size of at least ``minimum`` bytes (``shown`` the way a config would write it)."""

    def parse(value: object, key: str) -> int:
        size = parse_size(value, key)
        if size < minimum:
            raise ConfigError(f"{key}: must be at least {shown} ({minimum}), got {size}")
        return size

    return parse


_parse_journal_capacity = _size_at_least(JOURNAL_CAPACITY_MIN_BYTES, "1MiB")
_parse_nbd_memory_limit = _size_at_least(NBD_MEMORY_LIMIT_MIN_BYTES, "64MiB")


# --- the schema -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    base_dir: Path  # relative paths are resolved against this: the config file's directory
    role: Role


_Parser = Callable[[object, str, _Context], Any]


@dataclass(frozen=True, slots=True)
class _Key:
    """One row of a section table: how to parse a YAML key and which dataclass field it fills.

    ``field`` None means the value is a mapping of fields merged into the enclosing section
    (``listen.nbd`` fills Config.nbd_listen). A key is required for ``roles`` and optional for
    ``optional_for``, refused for any other role; an absent key that is not required takes
    ``default``.
    """

    parse: _Parser
    field: str | None
    required: bool = True
    default: object = None
    roles: frozenset[Role] = frozenset(ROLES)
    optional_for: frozenset[Role] = frozenset()


def _plain(parse: Callable[[object, str], object]) -> _Parser:
    return lambda value, key, _ctx: parse(value, key)


def _parse_path(value: object, key: str, ctx: _Context) -> Path:
    text = _expect_str(value, key)
    if not text or "\0" in text:
        raise ConfigError(f"{key}: bad path {text!r}")
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: path {text!r} is not valid UTF-8") from None
    path = Path(text)
    return path if path.is_absolute() else ctx.base_dir / path


def _parse_control(value: object, key: str, ctx: _Context) -> Path:
    path = _parse_path(value, key, ctx)
    if len(os.fsencode(path)) > CONTROL_PATH_MAX_BYTES:
        raise ConfigError(
            f"{key}: socket path {str(path)!r} is too long (max {CONTROL_PATH_MAX_BYTES} bytes)"
        )
    return path


def _parse_hook(value: object, key: str, ctx: _Context) -> tuple[str, ...]:
    """A command line split like a shell would (no shell runs it); null means no hook."""
    if value is None:
        return ()
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a command string or null, got {_type_name(value)}")
    if "\0" in value:
        raise ConfigError(f"{key}: bad command {value!r} (contains a NUL byte)")
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot parse command {value!r}: {exc}") from None
    if not argv:
        raise ConfigError(f"{key}: empty command {value!r} (use null for no hook)")
    # Like PATH lookup in a shell: a bare name is searched in PATH, a path is a path.
    program = Path(argv[0])
    if "/" in argv[0] and not program.is_absolute():
        argv[0] = str(ctx.base_dir / program)
    return tuple(argv)


def _section(keys: Mapping[str, _Key], build: Callable[..., object] | None = None) -> _Parser:
    """A parser for a mapping described by ``keys``: builds ``build(**fields)`` or the fields."""

    def parse(value: object, key: str, ctx: _Context) -> object:
        fields = _parse_fields(value, keys, key, ctx)
        return fields if build is None else build(**fields)

    return parse


def _parse_fields(
    value: object, keys: Mapping[str, _Key], prefix: str, ctx: _Context
) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping, got {_type_name(value)}")
    for name in value:
        if not isinstance(name, str) or name not in keys:
            raise ConfigError(f"{_join(prefix, str(name))}: unknown key")
    fields: dict[str, Any] = {}
    for name, row in keys.items():
        key = _join(prefix, name)
        allowed = ctx.role in row.roles
        if name in value:
            if not allowed and ctx.role not in row.optional_for:
                only = "/".join(sorted(row.roles))
                raise ConfigError(f"{key}: not allowed for role {ctx.role} ({only} only)")
            parsed = row.parse(value[name], key, ctx)
        elif row.required and allowed:
            why = "" if row.roles == frozenset(ROLES) else f" (required for role {ctx.role})"
            raise ConfigError(f"{key}: missing{why}")
        else:
            parsed = row.default
        if row.field is None:
            fields.update(parsed)
        else:
            fields[row.field] = parsed
    return fields


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parse_volumes(value: object, key: str, ctx: _Context) -> tuple[VolumeConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of volumes, got {_type_name(value)}")
    if not value:
        raise ConfigError(f"{key}: no volumes (need at least one)")
    volumes: list[VolumeConfig] = []
    names: dict[str, str] = {}
    paths: dict[str, str] = {}
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        volume = cast(VolumeConfig, _section(_VOLUME_KEYS, VolumeConfig)(item, item_key, ctx))
        if volume.name in names:
            also = names[volume.name]
            raise ConfigError(
                f"{item_key}.name: duplicate volume name {volume.name!r} (also {also})"
            )
        path = os.path.normpath(volume.path)
        if path in paths:
            raise ConfigError(f"{item_key}.path: duplicate volume path {path} (also {paths[path]})")
        names[volume.name] = f"{item_key}.name"
        paths[path] = f"{item_key}.path"
        volumes.append(volume)
    return tuple(volumes)


_VOLUME_KEYS: dict[str, _Key] = {
    "name": _Key(_plain(_parse_name), "name"),
    "path": _Key(_parse_path, "path"),
    "size": _Key(_plain(_parse_volume_size), "size"),
    "read_only": _Key(_plain(_parse_bool), "read_only", required=False, default=False),
}

_JOURNAL_KEYS: dict[str, _Key] = {
    "capacity": _Key(_plain(_parse_journal_capacity), "capacity"),
}

_LISTEN_KEYS: dict[str, _Key] = {
    "nbd": _Key(_plain(parse_address), "nbd_listen"),
    # A secondary may have it too: where it serves read-journal once a swap makes it primary.
    "replication": _Key(
        _plain(parse_address),
        "replication_listen",
        roles=frozenset({"primary"}),
        optional_for=frozenset({"secondary"}),
    ),
}

_PAIR_KEYS: dict[str, _Key] = {
    "path_watch_s": _Key(
        _plain(_parse_seconds), "path_watch_s", required=False, default=PATH_WATCH_DEFAULT_S
    ),
    "overflow_watch_s": _Key(
        _plain(_parse_seconds),
        "overflow_watch_s",
        required=False,
        default=OVERFLOW_WATCH_DEFAULT_S,
    ),
    "bitmap_region": _Key(
        _plain(_parse_bitmap_region),
        "bitmap_region",
        required=False,
        default=BITMAP_REGION_DEFAULT_BYTES,
    ),
    "auto_resync": _Key(_plain(_parse_bool), "auto_resync", required=False, default=False),
    "rpo_target_s": _Key(
        _plain(_parse_seconds_or_null), "rpo_target_s", required=False, default=None
    ),
    "inflow_control": _Key(_plain(_parse_bool), "inflow_control", required=False, default=False),
    "hook": _Key(_parse_hook, "hook", required=False, default=()),
    "hook_timeout_s": _Key(
        _plain(_parse_seconds), "hook_timeout_s", required=False, default=HOOK_TIMEOUT_DEFAULT_S
    ),
}

_TLS_KEYS: dict[str, _Key] = {
    "cert": _Key(_parse_path, "tls_cert"),
    "key": _Key(_parse_path, "tls_key"),
    "ca": _Key(_parse_path, "tls_ca"),
}
_NO_TLS = {"tls_cert": None, "tls_key": None, "tls_ca": None}

_LINK_KEYS: dict[str, _Key] = {
    "secret_file": _Key(_parse_path, "secret_file", required=False, default=None),
    "tls": _Key(_section(_TLS_KEYS), None, required=False, default=_NO_TLS),
    "allow_insecure": _Key(_plain(_parse_bool), "allow_insecure", required=False, default=False),
}

_NBD_TLS_KEYS: dict[str, _Key] = {
    "cert": _Key(_parse_path, "tls_cert"),
    "key": _Key(_parse_path, "tls_key"),
    "ca": _Key(_parse_path, "tls_ca", required=False, default=None),
    "mode": _Key(_plain(_parse_nbd_tls_mode), "tls_mode", required=False, default="require"),
}
_NBD_NO_TLS = {"tls_cert": None, "tls_key": None, "tls_ca": None, "tls_mode": "require"}

_NBD_KEYS: dict[str, _Key] = {
    "max_connections": _Key(
        _plain(_parse_max_connections),
        "max_connections",
        required=False,
        default=NBD_MAX_CONNECTIONS_DEFAULT,
    ),
    "handshake_timeout_s": _Key(
        _plain(_parse_seconds),
        "handshake_timeout_s",
        required=False,
        default=NBD_HANDSHAKE_TIMEOUT_DEFAULT_S,
    ),
    "stall_timeout_s": _Key(
        _plain(_parse_seconds),
        "stall_timeout_s",
        required=False,
        default=NBD_STALL_TIMEOUT_DEFAULT_S,
    ),
    "allow": _Key(_plain(_parse_allow), "allow", required=False, default=None),
    "tls": _Key(_section(_NBD_TLS_KEYS), None, required=False, default=_NBD_NO_TLS),
    "memory_limit": _Key(
        _plain(_parse_nbd_memory_limit),
        "memory_limit",
        required=False,
        default=NBD_MEMORY_LIMIT_DEFAULT_BYTES,
    ),
}

_ISCSI_CHAP_KEYS: dict[str, _Key] = {
    "user": _Key(_plain(_parse_chap_user), "chap_user"),
    "secret_file": _Key(_parse_path, "chap_secret_file"),
    "mutual_user": _Key(_plain(_parse_chap_user), "chap_mutual_user", required=False),
    "mutual_secret_file": _Key(_parse_path, "chap_mutual_secret_file", required=False),
}
_ISCSI_NO_CHAP = {
    "chap_user": None,
    "chap_secret_file": None,
    "chap_mutual_user": None,
    "chap_mutual_secret_file": None,
}

_ISCSI_KEYS: dict[str, _Key] = {
    "listen": _Key(_plain(parse_address), "listen", required=False, default=None),
    "iqn": _Key(_plain(_parse_iscsi_name), "iqn", required=False, default=""),
    "max_connections": _Key(
        _plain(_parse_iscsi_max_connections),
        "max_connections",
        required=False,
        default=ISCSI_MAX_CONNECTIONS_DEFAULT,
    ),
    "chap": _Key(_section(_ISCSI_CHAP_KEYS), None, required=False, default=_ISCSI_NO_CHAP),
    "allow_insecure": _Key(_plain(_parse_bool), "allow_insecure", required=False, default=False),
}

_METRICS_KEYS: dict[str, _Key] = {
    "listen": _Key(_plain(parse_address), "listen"),
}

_LOG_KEYS: dict[str, _Key] = {
    "format": _Key(_plain(_choice(LOG_FORMATS)), "format", required=False, default="text"),
    "level": _Key(_plain(_choice(tuple(LEVELS))), "level", required=False, default="info"),
}

_TOP_KEYS: dict[str, _Key] = {
    "role": _Key(_plain(_parse_role), "role"),
    "group": _Key(_plain(_parse_name), "group"),
    "data_dir": _Key(_parse_path, "data_dir"),
    "listen": _Key(_section(_LISTEN_KEYS), None),
    # A primary may have it too: the other site's listen.replication, where this site pulls
    # from once a swap makes it the secondary.
    "primary": _Key(
        _plain(parse_address),
        "primary",
        roles=frozenset({"secondary"}),
        optional_for=frozenset({"primary"}),
    ),
    "control": _Key(_parse_control, "control"),
    "journal": _Key(_section(_JOURNAL_KEYS, JournalConfig), "journal"),
    "volumes": _Key(_parse_volumes, "volumes"),
    "pair": _Key(_section(_PAIR_KEYS, PairConfig), "pair", required=False, default=PairConfig()),
    "link": _Key(_section(_LINK_KEYS, LinkConfig), "link", required=False, default=LinkConfig()),
    "nbd": _Key(_section(_NBD_KEYS, NbdConfig), "nbd", required=False, default=NbdConfig()),
    "iscsi": _Key(
        _section(_ISCSI_KEYS, IscsiConfig), "iscsi", required=False, default=IscsiConfig()
    ),
    "metrics": _Key(
        _section(_METRICS_KEYS, MetricsConfig), "metrics", required=False, default=MetricsConfig()
    ),
    "log": _Key(_section(_LOG_KEYS, LogConfig), "log", required=False, default=LogConfig()),
}


# --- loading --------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config at ``path``; raise ConfigError on the first problem."""
    source = Path(path).absolute()
    document = _read_yaml(source)
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"{source}: top level must be a mapping of keys, got {_type_name(document)}"
        )
    # The role decides which keys are allowed, so it is parsed before the rest.
    if "role" not in document:
        raise ConfigError("role: missing")
    ctx = _Context(base_dir=source.parent, role=_parse_role(document["role"], "role"))
    fields = _parse_fields(document, _TOP_KEYS, "", ctx)
    config = Config(source=source, **fields)
    _check_listen(config)
    _check_iscsi_listen(config)
    _check_iscsi_chap(config.iscsi)
    _check_link(config)
    _check_nbd_memory(config.nbd)
    _check_inflow(config.pair)
    return config


def _read_yaml(source: Path) -> object:
    try:
        with source.open("rb") as file:
            data = file.read(CONFIG_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror or exc}") from exc
    if len(data) > CONFIG_FILE_MAX_BYTES:
        raise ConfigError(f"{source}: config is larger than {CONFIG_FILE_MAX_BYTES} bytes")
    try:
        return yaml.load(data, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_error_line(exc)}") from exc
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise ConfigError(f"{source}: YAML value refused: {exc}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML says keys are
    unique; PyYAML keeps the last, so a typo'd duplicate would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"YAML syntax error at {where}: {problem}"
    return "YAML error: " + " ".join(str(exc).split())


def _check_listen(config: Config) -> None:
    """Two listeners on one address would fail at bind time; say so before starting."""
    replication = config.replication_listen
    if replication is not None and replication.port != 0 and replication == config.nbd_listen:
        raise ConfigError(f"listen.replication: same address as listen.nbd ({replication})")
    metrics = config.metrics.listen
    if metrics is None or metrics.port == 0:
        return
    for key, other in (("listen.nbd", config.nbd_listen), ("listen.replication", replication)):
        if metrics == other:
            raise ConfigError(f"metrics.listen: same address as {key} ({metrics})")


def _check_iscsi_listen(config: Config) -> None:
    listen = config.iscsi.listen
    if listen is None or listen.port == 0:
        return
    others = (
        ("listen.nbd", config.nbd_listen),
        ("listen.replication", config.replication_listen),
        ("metrics.listen", config.metrics.listen),
    )
    for key, other in others:
        if listen == other:
            raise ConfigError(f"iscsi.listen: same address as {key} ({listen})")


def _check_iscsi_chap(iscsi: IscsiConfig) -> None:
    """Mutual CHAP needs both halves. Serving beyond this host without CHAP lets anyone who
    reaches the port read and write every volume (and the writes are replicated): refused
    unless explicitly allowed, as for the replication link (an isolated SAN may say so)."""
    if (iscsi.chap_mutual_user is None) != (iscsi.chap_mutual_secret_file is None):
        given, missing = (
            ("mutual_user", "mutual_secret_file")
            if iscsi.chap_mutual_secret_file is None
            else ("mutual_secret_file", "mutual_user")
        )
        raise ConfigError(
            f"iscsi.chap.{missing}: missing (iscsi.chap.{given} is set: mutual CHAP needs both)"
        )
    if iscsi.exposed_without_chap and not iscsi.allow_insecure:
        raise ConfigError(
            f"iscsi.listen: {iscsi.listen} is not a loopback address and iSCSI has no "
            "authentication: set iscsi.chap (or iscsi.allow_insecure: true on an isolated SAN)"
        )


def _check_inflow(pair: PairConfig) -> None:
    if pair.inflow_control and pair.rpo_target_s is None:
        raise ConfigError("pair.inflow_control: needs pair.rpo_target_s (the lag it holds to)")


def _check_nbd_memory(nbd: NbdConfig) -> None:
    """Half of nbd.memory_limit is shared out between the connection slots: each share must
    let a client do small I/O however much the others hold (common.nbd.budget)."""
    wanted = nbd.max_connections * NBD_MEMORY_PER_CONNECTION_MIN_BYTES
    if nbd.memory_limit < wanted:
        raise ConfigError(
            f"nbd.memory_limit: {nbd.memory_limit} is less than 128KiB per connection; "
            f"nbd.max_connections {nbd.max_connections} needs at least {wanted}"
        )


def _check_link(config: Config) -> None:
    """Serving replication beyond this host unauthenticated lets anyone read the journal
    (every host write) and pose as the secondary: refused unless explicitly allowed."""
    listen, link = config.replication_listen, config.link
    if listen is None or link.authenticated or link.allow_insecure or _is_loopback(listen.host):
        return
    raise ConfigError(
        f"listen.replication: {listen} is not a loopback address and the link has no "
        "authentication: set link.secret_file or link.tls (or link.allow_insecure: true)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_volume_files(config: Config) -> None:
    """Check every volume path against the config; create and modify nothing.

    A missing file is fine (the daemon creates it, and its directories). An existing path must
    be a regular file of exactly the configured size: a different size is refused, never
    truncated. All volumes are checked before the caller creates any of them.
    """
    seen: dict[tuple[int, int], str] = {}
    for index, volume in enumerate(config.volumes):
        key = f"volumes[{index}].path"
        try:
            st = os.stat(volume.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"{key}: cannot check {volume.path}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{key}: {volume.path} exists and is not a regular file")
        if st.st_size != volume.size:
            raise ConfigError(
                f"{key}: {volume.path} exists with size {st.st_size}, "
                f"config says {volume.size}; refusing to truncate"
            )
        identity = (st.st_dev, st.st_ino)
        if identity in seen:
            raise ConfigError(f"{key}: {volume.path} is the same file as {seen[identity]}")
        seen[identity] = key
