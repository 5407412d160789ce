"""common.config: the Config contract of ARCHITECTURE.md, one rule per test."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from common.config import (
    Address,
    Config,
    ConfigError,
    JournalConfig,
    LogConfig,
    PairConfig,
    VolumeConfig,
    check_volume_files,
    load_config,
    parse_address,
    parse_size,
)

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30
MiB = 1 << 20

PRIMARY = """\
role: primary
group: jg0
data_dir: data
listen:
  nbd: 127.0.0.1:10809
  replication: 127.0.0.1:7410
control: /run/journalpair/primary.sock
journal:
  capacity: 1GiB
volumes:
  - {name: vol0, path: data/vol0.img, size: 1GiB}
  - {name: vol1, path: /abs/vol1.img, size: 268435456}
"""

SECONDARY = """\
role: secondary
group: jg0
data_dir: /var/lib/journalpair/secondary
listen:
  nbd: "[::1]:10810"
primary: 127.0.0.1:7410
control: ctl.sock
journal:
  capacity: 64MiB
volumes:
  - {name: vol0, path: /var/lib/journalpair/secondary/vol0.img, size: 1GiB}
"""


def write(tmp_path: Path, text: str, name: str = "jp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# --- good configs -----------------------------------------------------------------------------


def test_primary_config_parses_to_values_with_relative_paths_under_config_dir(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, PRIMARY)
    config = load_config(str(path))
    assert config == Config(
        source=path,
        role="primary",
        group="jg0",
        data_dir=tmp_path / "data",
        nbd_listen=Address("127.0.0.1", 10809),
        replication_listen=Address("127.0.0.1", 7410),
        primary=None,
        control=Path("/run/journalpair/primary.sock"),
        journal=JournalConfig(capacity=GiB),
        volumes=(
            VolumeConfig("vol0", tmp_path / "data" / "vol0.img", GiB),
            VolumeConfig("vol1", Path("/abs/vol1.img"), 256 * MiB),
        ),
        pair=PairConfig(path_watch_s=30.0, auto_resync=False, hook=(), hook_timeout_s=30.0),
    )


def test_relative_paths_do_not_depend_on_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = write(config_dir, PRIMARY)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc") / path.name)
    assert config.source == path
    assert config.data_dir == config_dir / "data"
    assert config.volumes[0].path == config_dir / "data" / "vol0.img"


def test_secondary_config_parses_ipv6_and_relative_control(tmp_path: Path) -> None:
    config = load_text(tmp_path, SECONDARY)
    assert config.role == "secondary"
    assert config.nbd_listen == Address("::1", 10810)
    assert config.replication_listen is None
    assert config.primary == Address("127.0.0.1", 7410)
    assert config.control == tmp_path / "ctl.sock"
    assert config.journal == JournalConfig(64 * MiB)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_text(tmp_path, PRIMARY)
    with pytest.raises(AttributeError):
        config.group = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["primary.yaml", "secondary.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(REPO / "configs" / name)
    role = name.removesuffix(".yaml")
    assert config.role == role
    assert config.group == "jg0"
    assert config.data_dir == Path(f"/var/lib/journalpair/{role}")
    assert config.control == Path(f"/run/journalpair/{role}.sock")
    assert config.journal.capacity == GiB
    assert [(v.name, v.size) for v in config.volumes] == [("vol0", GiB), ("vol1", 256 * MiB)]
    assert all(v.path.parent == config.data_dir for v in config.volumes)
    assert config.pair == PairConfig()  # the example pair section is commented out


@pytest.mark.parametrize("name", ["primary.yaml", "secondary.yaml"])
def test_shipped_pair_example_loads_when_uncommented(name: str, tmp_path: Path) -> None:
    text = (REPO / "configs" / name).read_text()
    assert "\n#pair:\n" in text
    text = text.replace("\n#pair:\n", "\npair:\n")
    text = re.sub(r"^#  ([a-z_]+:)", r"  \1", text, flags=re.MULTILINE)
    pair = load_text(tmp_path, text).pair
    site = "a" if name == "primary.yaml" else "b"
    hook = ("/usr/local/sbin/jp-notify", "--site", site)
    assert pair == PairConfig(
        path_watch_s=30.0,
        overflow_watch_s=60.0,
        bitmap_region=64 * 1024,
        auto_resync=False,
        hook=hook,
        hook_timeout_s=30.0,
    )


def test_shipped_configs_fit_together() -> None:
    primary = load_config(REPO / "configs" / "primary.yaml")
    secondary = load_config(REPO / "configs" / "secondary.yaml")
    assert primary.nbd_listen == Address("127.0.0.1", 10809)
    assert secondary.nbd_listen == Address("127.0.0.1", 10810)
    assert primary.replication_listen == secondary.primary == Address("127.0.0.1", 7410)


# --- parse_size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("512", 512),
        ("64KiB", 64 << 10),
        ("64MiB", 64 * MiB),
        ("1GiB", GiB),
        ("1 GiB", GiB),
        ("2TiB", 2 << 40),
    ],
)
def test_parse_size_accepts_bytes_and_iec_suffixes(value: object, expected: int) -> None:
    assert parse_size(value, "k") == expected


@pytest.mark.parametrize(
    "value",
    [
        "12XB",
        "1G",
        "1K",
        "1GB",
        "1MB",
        "1gib",
        "1.5GiB",
        "GiB",
        "",
        "-1",
        " 1GiB",
        "1  GiB",
        "١٢",
        -1,
        1.5,
        True,
        None,
        [1],
        1 << 63,
    ],
)
def test_parse_size_refuses_anything_else(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^journal\.capacity: "):
        parse_size(value, "journal.capacity")


def test_parse_size_message_names_key_value_and_units() -> None:
    with pytest.raises(ConfigError) as info:
        parse_size("12XB", "volumes[1].size")
    assert str(info.value) == (
        "volumes[1].size: bad size '12XB' (use bytes or a number with KiB/MiB/GiB/TiB)"
    )


# --- parse_address ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "text"),
    [
        ("127.0.0.1:10809", Address("127.0.0.1", 10809), "127.0.0.1:10809"),
        ("localhost:0", Address("localhost", 0), "localhost:0"),
        ("0.0.0.0:65535", Address("0.0.0.0", 65535), "0.0.0.0:65535"),
        ("[::1]:10809", Address("::1", 10809), "[::1]:10809"),
        ("[::]:7410", Address("::", 7410), "[::]:7410"),
        ("site-b.example.com:7410", Address("site-b.example.com", 7410), None),
    ],
)
def test_parse_address(value: str, expected: Address, text: str | None) -> None:
    address = parse_address(value, "k")
    assert address == expected
    assert isinstance(address.port, int)
    assert str(address) == (text or value)


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1",
        ":10809",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1:1e3",
        "::1:10809",
        "[::1]10809",
        "[127.0.0.1]:10809",
        "[::1:10809",
        "999.0.0.1:10809",
        "bad host:10809",
        10809,
        None,
        ["127.0.0.1", 10809],
    ],
)
def test_parse_address_refuses(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^listen\.nbd: bad (address|port)"):
        parse_address(value, "listen.nbd")


def test_unquoted_base60_address_gets_a_hint(tmp_path: Path) -> None:
    message = error_of(tmp_path, edit(SECONDARY, "primary: 127.0.0.1:7410", "primary: 10:30"))
    assert message == "primary: bad address 630 (want host:port; quote it in YAML)"


def test_parse_address_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_address("127.0.0.1", "listen.nbd")
    assert str(info.value) == "listen.nbd: bad address '127.0.0.1' (want host:port)"


# --- load_config errors -----------------------------------------------------------------------

VOL0 = "{name: vol0, path: data/vol0.img, size: 1GiB}"
LISTEN = "listen:\n  nbd: 127.0.0.1:10809\n  replication: 127.0.0.1:7410\n"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # unknown keys, at every level
        ("group: jg0\n", "group: jg0\ncolour: red\n", "colour: unknown key"),
        ("capacity: 1GiB", "capcity: 1GiB", "journal.capcity: unknown key"),
        ("  nbd: 127.0.0.1:10809", "  ndb: 127.0.0.1:10809", "listen.ndb: unknown key"),
        (VOL0, "{name: vol0, path: data/vol0.img, size: 1GiB, sise: 1}", "volumes[0].sise:"),
        ("group: jg0\n", "group: jg0\n7: x\n", "7: unknown key"),
        # missing keys
        ("group: jg0\n", "", "group: missing"),
        ("data_dir: data\n", "", "data_dir: missing"),
        ("control: /run/journalpair/primary.sock\n", "", "control: missing"),
        ("  nbd: 127.0.0.1:10809\n", "", "listen.nbd: missing"),
        ("  replication: 127.0.0.1:7410\n", "", "listen.replication: missing"),
        ("journal:\n  capacity: 1GiB\n", "", "journal: missing"),
        ("  capacity: 1GiB\n", "  {}\n", "journal.capacity: missing"),
        (VOL0, "{name: vol0, size: 1GiB}", "volumes[0].path: missing"),
        (VOL0, "{path: data/vol0.img, size: 1GiB}", "volumes[0].name: missing"),
        (VOL0, "{name: vol0, path: data/vol0.img}", "volumes[0].size: missing"),
        # role
        ("role: primary", "role: master", "role: must be primary or secondary"),
        ("role: primary", "role: [primary]", "role: must be primary or secondary"),
        ("role: primary\n", "", "role: missing"),
        # wrong types
        ("group: jg0", "group: 7", "group: expected a string, got integer"),
        ("data_dir: data", "data_dir: [a, b]", "data_dir: expected a string, got list"),
        ("data_dir: data", "data_dir:", "data_dir: expected a string, got null"),
        ("data_dir: data", "data_dir: ''", "data_dir: bad path ''"),
        ("control: /run/journalpair/primary.sock", "control: 5", "control: expected a string"),
        ("journal:\n  capacity: 1GiB", "journal: 1GiB", "journal: expected a mapping"),
        (LISTEN, "listen: 127.0.0.1:10809\n", "listen: expected a mapping, got string"),
        (VOL0, "vol0", "volumes[0]: expected a mapping, got string"),
        (VOL0, "{name: vol0, path: 7, size: 1GiB}", "volumes[0].path: expected a string"),
        # bad names
        ("group: jg0", "group: 'j g'", "group: bad name 'j g'"),
        ("group: jg0", "group: ''", "group: bad name ''"),
        ("group: jg0", "group: " + "g" * 65, "group: bad name"),
        ("group: jg0", "group: ..", "group: bad name"),
        ("group: jg0", "group: jé", "group: bad name"),
        (VOL0, "{name: vol/0, path: data/vol0.img, size: 1GiB}", "volumes[0].name: bad name"),
        (VOL0, "{name: 0, path: data/vol0.img, size: 1GiB}", "volumes[0].name: expected a str"),
        # sizes
        (VOL0, "{name: vol0, path: data/vol0.img, size: 12XB}", "volumes[0].size: bad size"),
        (VOL0, "{name: vol0, path: data/vol0.img, size: 0}", "volumes[0].size: must be a pos"),
        (VOL0, "{name: vol0, path: data/vol0.img, size: 1000}", "volumes[0].size: must be a pos"),
        (VOL0, "{name: vol0, path: data/vol0.img, size: -512}", "volumes[0].size: bad size"),
        ("capacity: 1GiB", "capacity: 1023KiB", "journal.capacity: must be at least 1MiB"),
        ("capacity: 1GiB", "capacity: 1.5GiB", "journal.capacity: bad size"),
        ("capacity: 1GiB", "capacity: true", "journal.capacity: bad size"),
        # addresses
        ("nbd: 127.0.0.1:10809", "nbd: 127.0.0.1", "listen.nbd: bad address '127.0.0.1'"),
        ("nbd: 127.0.0.1:10809", "nbd: 127.0.0.1:99999", "listen.nbd: bad port"),
        ("replication: 127.0.0.1:7410", "replication: 7410", "listen.replication: bad address"),
        ("replication: 127.0.0.1:7410", "replication: 127.0.0.1:10809", "listen.replication: same"),
    ],
)
def test_primary_errors_name_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    message = error_of(tmp_path, edit(PRIMARY, old, new))
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("volumes", "expected"),
    [
        ("volumes: []", "volumes: no volumes"),
        ("volumes:", "volumes: expected a list of volumes, got null"),
        ("volumes: {name: vol0}", "volumes: expected a list of volumes, got mapping"),
        (
            "volumes:\n  - {name: vol0, path: a.img, size: 1MiB}\n"
            "  - {name: vol0, path: b.img, size: 1MiB}",
            "volumes[1].name: duplicate volume name 'vol0' (also volumes[0].name)",
        ),
        (
            "volumes:\n  - {name: vol0, path: a.img, size: 1MiB}\n"
            "  - {name: vol1, path: ./x/../a.img, size: 1MiB}",
            "volumes[1].path: duplicate volume path",
        ),
    ],
)
def test_volume_list_errors(tmp_path: Path, volumes: str, expected: str) -> None:
    head, _, _ = PRIMARY.partition("volumes:")
    message = error_of(tmp_path, head + volumes + "\n")
    assert message.startswith(expected), message


def test_each_role_may_name_the_address_it_needs_after_a_swap(tmp_path: Path) -> None:
    """listen.replication on a secondary, primary: on a primary: optional, for a swap."""
    text = edit(
        SECONDARY, '  nbd: "[::1]:10810"\n', '  nbd: "[::1]:10810"\n  replication: localhost:1\n'
    )
    assert load_text(tmp_path, text).replication_listen == Address("localhost", 1)
    text = edit(PRIMARY, "group: jg0\n", "group: jg0\nprimary: 127.0.0.2:7410\n")
    assert load_text(tmp_path, text).primary == Address("127.0.0.2", 7410)


def test_secondary_requires_primary(tmp_path: Path) -> None:
    message = error_of(tmp_path, edit(SECONDARY, "primary: 127.0.0.1:7410\n", ""))
    assert message.startswith("primary: missing"), message


def test_secondary_bad_primary_address(tmp_path: Path) -> None:
    message = error_of(tmp_path, edit(SECONDARY, "primary: 127.0.0.1:7410", "primary: x"))
    assert message.startswith("primary: bad address 'x'"), message


def test_port_zero_listeners_may_share_an_address(tmp_path: Path) -> None:
    text = edit(PRIMARY, "127.0.0.1:10809", "127.0.0.1:0")
    config = load_text(tmp_path, edit(text, "127.0.0.1:7410", "127.0.0.1:0"))
    assert config.nbd_listen == config.replication_listen == Address("127.0.0.1", 0)


def test_control_socket_path_too_long(tmp_path: Path) -> None:
    text = edit(PRIMARY, "/run/journalpair/primary.sock", "/run/" + "s" * 120 + ".sock")
    assert error_of(tmp_path, text).startswith("control: socket path")


# --- the optional pair section ------------------------------------------------------------


def with_pair(text: str, pair: str) -> str:
    return text + "pair:\n" + textwrap.indent(textwrap.dedent(pair), "  ")


@pytest.mark.parametrize("base", [PRIMARY, SECONDARY])
def test_pair_section_is_optional_with_defaults(tmp_path: Path, base: str) -> None:
    pair = load_text(tmp_path, base).pair
    assert pair == PairConfig()
    assert (pair.path_watch_s, pair.auto_resync, pair.hook, pair.hook_timeout_s) == (
        30.0,
        False,
        (),
        30.0,
    )
    assert load_text(tmp_path, base + "pair: {}\n").pair == PairConfig()


@pytest.mark.parametrize("base", [PRIMARY, SECONDARY])
def test_pair_section_parses_for_both_roles(tmp_path: Path, base: str) -> None:
    pair = """\
        path_watch_s: 2.5
        auto_resync: true
        hook: "hooks/notify.sh --to 'ops team' -v"
        hook_timeout_s: 5
    """
    config = load_text(tmp_path, with_pair(base, pair))
    assert config.pair == PairConfig(
        path_watch_s=2.5,
        auto_resync=True,
        hook=(str(tmp_path / "hooks" / "notify.sh"), "--to", "ops team", "-v"),
        hook_timeout_s=5.0,
    )
    assert isinstance(config.pair.hook_timeout_s, float)


@pytest.mark.parametrize(
    ("hook", "argv"),
    [
        ("logger -t journalpair", ("logger", "-t", "journalpair")),  # a bare name: PATH lookup
        ("/usr/local/bin/jp-hook x", ("/usr/local/bin/jp-hook", "x")),
        ("./jp-hook", ("{dir}/jp-hook",)),
        ("../bin/jp-hook", ("{dir}/../bin/jp-hook",)),
        ("bin/jp-hook ./arg", ("{dir}/bin/jp-hook", "./arg")),  # only the program is resolved
        ("\"sh -c 'echo $JP_NEW_STATE'\"", ("sh", "-c", "echo $JP_NEW_STATE")),  # no expansion
        ("null", ()),
        ("~", ()),
    ],
)
def test_pair_hook_is_split_and_relative_paths_resolved(
    tmp_path: Path, hook: str, argv: tuple[str, ...]
) -> None:
    config = load_text(tmp_path, with_pair(PRIMARY, f"hook: {hook}\n"))
    assert config.pair.hook == tuple(arg.replace("{dir}", str(tmp_path)) for arg in argv)


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("colour: red", "pair.colour: unknown key"),
        ("path_watch: 30", "pair.path_watch: unknown key"),
        # numbers of seconds
        ("path_watch_s: '30'", "pair.path_watch_s: expected a number of seconds, got string"),
        ("path_watch_s: 30s", "pair.path_watch_s: expected a number of seconds, got string"),
        ("path_watch_s: true", "pair.path_watch_s: expected a number of seconds, got boolean"),
        ("path_watch_s:", "pair.path_watch_s: expected a number of seconds, got null"),
        ("path_watch_s: [30]", "pair.path_watch_s: expected a number of seconds, got list"),
        ("path_watch_s: 0", "pair.path_watch_s: must be a positive number of seconds, got 0"),
        ("path_watch_s: -5", "pair.path_watch_s: must be a positive number of seconds, got -5"),
        ("path_watch_s: -0.5", "pair.path_watch_s: must be a positive number"),
        ("path_watch_s: .inf", "pair.path_watch_s: must be a positive number"),
        ("path_watch_s: .nan", "pair.path_watch_s: must be a positive number"),
        ("hook_timeout_s: -1", "pair.hook_timeout_s: must be a positive number of seconds"),
        ("hook_timeout_s: 0.0", "pair.hook_timeout_s: must be a positive number of seconds"),
        ("hook_timeout_s: 'ten'", "pair.hook_timeout_s: expected a number of seconds"),
        # booleans, also when given as strings
        ("auto_resync: 'true'", "pair.auto_resync: expected true or false, got string 'true'"),
        ("auto_resync: 'yes'", "pair.auto_resync: expected true or false, got string 'yes'"),
        ("auto_resync: 'false'", "pair.auto_resync: expected true or false, got string"),
        ("auto_resync: 1", "pair.auto_resync: expected true or false, got integer 1"),
        ("auto_resync:", "pair.auto_resync: expected true or false, got null"),
        # the hook command
        ("hook: ''", "pair.hook: empty command ''"),
        ("hook: '   '", "pair.hook: empty command"),
        ('hook: "notify \'unclosed"', "pair.hook: cannot parse command"),
        ("hook: 5", "pair.hook: expected a command string or null, got integer"),
        ("hook: [notify, x]", "pair.hook: expected a command string or null, got list"),
        ("hook: true", "pair.hook: expected a command string or null, got boolean"),
        ('hook: "a\\0b"', "pair.hook: bad command"),
    ],
)
def test_pair_errors_name_the_key(tmp_path: Path, pair: str, expected: str) -> None:
    message = error_of(tmp_path, with_pair(SECONDARY, pair + "\n"))
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("value", "got"), [("5", "integer"), ("[a]", "list"), ("", "null"), ("on", "boolean")]
)
def test_pair_section_must_be_a_mapping(tmp_path: Path, value: str, got: str) -> None:
    message = error_of(tmp_path, PRIMARY + f"pair: {value}\n")
    assert message.startswith(f"pair: expected a mapping, got {got}"), message


# --- file-level errors ------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_config(path)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config"):
        load_config(tmp_path)


def test_yaml_syntax_error_is_one_line_with_line_number(tmp_path: Path) -> None:
    text = "role: primary\ngroup: jg0\nlisten: {nbd: 127.0.0.1:10809\ncontrol: x\n"
    message = error_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "jp.yaml") + ": YAML syntax error at line "), message


def test_yaml_syntax_error_reports_the_right_line(tmp_path: Path) -> None:
    text = "role: primary\ngroup: jg0\ndata_dir: [unclosed\n"
    message = error_of(tmp_path, text)
    assert "line 4" in message or "line 3" in message, message


def test_tab_indentation_is_a_syntax_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "role: primary\nlisten:\n\tnbd: 127.0.0.1:1\n")
    assert "YAML syntax error at line 3" in message, message


def test_invalid_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"role: primary\ngroup: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: YAML"):
        load_config(path)


@pytest.mark.parametrize(("text", "got"), [("", "null"), ("- a\n", "list"), ("hello\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    message = error_of(tmp_path, text)
    assert "top level must be a mapping" in message and got in message, message
    assert message.startswith(str(tmp_path / "jp.yaml")), message


def test_huge_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(PRIMARY + "#" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: config is larger"):
        load_config(path)


# --- check_volume_files -----------------------------------------------------------------------


def small_config(tmp_path: Path, *sizes: int) -> Config:
    volumes = "".join(
        f"  - {{name: v{i}, path: data/v{i}.img, size: {size}}}\n" for i, size in enumerate(sizes)
    )
    head, _, _ = PRIMARY.partition("volumes:")
    return load_text(tmp_path, head + "volumes:\n" + volumes)


def test_check_volume_files_accepts_missing_and_matching_files(tmp_path: Path) -> None:
    config = small_config(tmp_path, MiB, 2 * MiB)
    before = sorted(tmp_path.iterdir())
    check_volume_files(config)  # nothing exists yet, not even data/
    assert sorted(tmp_path.iterdir()) == before  # and nothing was created
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v0.img").write_bytes(b"\0" * MiB)
    check_volume_files(config)
    assert not (tmp_path / "data" / "v1.img").exists()


def test_check_volume_files_refuses_other_size_and_leaves_file_untouched(tmp_path: Path) -> None:
    config = small_config(tmp_path, MiB, 2 * MiB)
    (tmp_path / "data").mkdir()
    v1 = tmp_path / "data" / "v1.img"
    v1.write_bytes(b"x" * 4096)
    os.utime(v1, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = v1.stat()
    with pytest.raises(ConfigError) as info:
        check_volume_files(config)
    assert str(info.value) == (
        f"volumes[1].path: {v1} exists with size 4096, config says {2 * MiB}; refusing to truncate"
    )
    after = v1.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert v1.read_bytes() == b"x" * 4096
    assert not (tmp_path / "data" / "v0.img").exists()  # checking creates nothing


def test_check_volume_files_refuses_a_directory(tmp_path: Path) -> None:
    config = small_config(tmp_path, MiB)
    (tmp_path / "data" / "v0.img").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^volumes\[0\]\.path: .*v0\.img.* not a regular file"):
        check_volume_files(config)


def test_check_volume_files_refuses_two_volumes_on_one_file(tmp_path: Path) -> None:
    config = small_config(tmp_path, MiB, MiB)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v0.img").write_bytes(b"\0" * MiB)
    (tmp_path / "data" / "v1.img").symlink_to("v0.img")
    with pytest.raises(ConfigError, match=r"^volumes\[1\]\.path: .* same file as volumes\[0\]"):
        check_volume_files(config)


def test_check_volume_files_parent_is_a_file(tmp_path: Path) -> None:
    config = small_config(tmp_path, MiB)
    (tmp_path / "data").write_text("not a dir")
    with pytest.raises(ConfigError, match=r"^volumes\[0\]\.path: cannot check"):
        check_volume_files(config)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("4KiB", 4096), ("1MiB", 1 << 20), (65536, 65536)],
)
def test_bitmap_region_is_a_size(tmp_path: Path, value: object, expected: int) -> None:
    text = PRIMARY + f"pair: {{bitmap_region: {value}}}\n"
    assert load_text(tmp_path, text).pair.bitmap_region == expected


@pytest.mark.parametrize("value", ["2KiB", "96KiB", "0", "true"])
def test_bitmap_region_must_be_a_power_of_two_of_4kib_or_more(tmp_path: Path, value: str) -> None:
    message = error_of(tmp_path, PRIMARY + f"pair: {{bitmap_region: {value}}}\n")
    assert message.startswith("pair.bitmap_region:"), message


# --- the optional metrics section ---------------------------------------------------------


@pytest.mark.parametrize("base", [PRIMARY, SECONDARY])
def test_metrics_are_off_unless_metrics_listen_is_set(tmp_path: Path, base: str) -> None:
    assert load_text(tmp_path, base).metrics.listen is None
    text = base + "metrics: {listen: '127.0.0.1:9110'}\n"
    assert load_text(tmp_path, text).metrics.listen == Address("127.0.0.1", 9110)


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ("{listen: 9110}", "metrics.listen: bad address 9110 (want host:port; quote it in YAML)"),
        ("{listen: localhost}", "metrics.listen: bad address 'localhost' (want host:port)"),
        ("{listen: '127.0.0.1:70000'}", "metrics.listen: bad port in '127.0.0.1:70000'"),
        ("{}", "metrics.listen: missing"),
        ("{port: 9110}", "metrics.port: unknown key"),
        ("'127.0.0.1:9110'", "metrics: expected a mapping, got string"),
        ("{listen: '127.0.0.1:10809'}", "metrics.listen: same address as listen.nbd"),
        ("{listen: '127.0.0.1:7410'}", "metrics.listen: same address as listen.replication"),
    ],
)
def test_metrics_errors_name_the_key(tmp_path: Path, metrics: str, expected: str) -> None:
    message = error_of(tmp_path, PRIMARY + f"metrics: {metrics}\n")
    assert message.startswith(expected), message


# --- log: and the RPO target ------------------------------------------------------------------


@pytest.mark.parametrize("base", [PRIMARY, SECONDARY])
def test_log_section_is_optional_with_defaults(tmp_path: Path, base: str) -> None:
    assert load_text(tmp_path, base).log == LogConfig(format="text", level="info")
    config = load_text(tmp_path, base + "log: {format: json, level: debug}\n")
    assert config.log == LogConfig(format="json", level="debug")


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        ("{format: yaml}", "log.format: must be text, logfmt or json, got 'yaml'"),
        ("{format: JSON}", "log.format: must be text, logfmt or json, got 'JSON'"),
        ("{level: verbose}", "log.level: must be debug, info, warning or error, got 'verbose'"),
        ("{level: 10}", "log.level: must be debug, info, warning or error, got 10"),
        ("{colour: true}", "log.colour: unknown key"),
        ("json", "log: expected a mapping, got string"),
    ],
)
def test_log_errors_name_the_key(tmp_path: Path, log: str, expected: str) -> None:
    assert error_of(tmp_path, PRIMARY + f"log: {log}\n") == expected


def test_rpo_target_and_inflow_control(tmp_path: Path) -> None:
    pair = load_text(tmp_path, with_pair(PRIMARY, "rpo_target_s: 2.5\ninflow_control: true\n")).pair
    assert (pair.rpo_target_s, pair.inflow_control) == (2.5, True)
    assert (PairConfig().rpo_target_s, PairConfig().inflow_control) == (None, False)


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("rpo_target_s: 0", "pair.rpo_target_s: must be a positive number of seconds, got 0"),
        ("rpo_target_s: 2s", "pair.rpo_target_s: expected a number of seconds, got string"),
        ("inflow_control: 'on'", "pair.inflow_control: expected true or false, got string"),
        (
            "inflow_control: true",
            "pair.inflow_control: needs pair.rpo_target_s (the lag it holds to)",
        ),
    ],
)
def test_rpo_errors_name_the_key(tmp_path: Path, pair: str, expected: str) -> None:
    message = error_of(tmp_path, with_pair(PRIMARY, pair + "\n"))
    assert message.startswith(expected), message


# --- the optional iscsi section ------------------------------------------------------------


@pytest.mark.parametrize("base", [PRIMARY, SECONDARY])
def test_iscsi_is_off_unless_iscsi_listen_is_set_and_its_iqn_comes_from_the_group(
    tmp_path: Path, base: str
) -> None:
    config = load_text(tmp_path, base)
    assert config.iscsi.listen is None and config.iscsi.max_connections == 16
    assert config.iscsi_iqn == "iqn.2026-01.org.journalpair:jg0"
    config = load_text(tmp_path, base + "iscsi: {listen: '127.0.0.1:3260'}\n")
    assert config.iscsi.listen == Address("127.0.0.1", 3260)
    named = (
        "iscsi: {listen: '0.0.0.0:3260', iqn: eui.02004567A425678D, max_connections: 4,\n"
        "        allow_insecure: true}\n"
    )
    config = load_text(tmp_path, base + named)
    assert (config.iscsi_iqn, config.iscsi.max_connections) == ("eui.02004567A425678D", 4)


def test_a_group_name_iscsi_does_not_allow_becomes_a_valid_default_iqn(tmp_path: Path) -> None:
    config = load_text(tmp_path, edit(PRIMARY, "group: jg0", "group: Site_A.jg0"))
    assert config.iscsi_iqn == "iqn.2026-01.org.journalpair:site-a.jg0"


@pytest.mark.parametrize(
    ("iscsi", "expected"),
    [
        ("{listen: 3260}", "iscsi.listen: bad address 3260 (want host:port; quote it in YAML)"),
        ("{listen: '127.0.0.1:10809'}", "iscsi.listen: same address as listen.nbd"),
        ("{listen: '127.0.0.1:7410'}", "iscsi.listen: same address as listen.replication"),
        (
            "{iqn: iqn.2026-01.Org.Example:x}",
            "iscsi.iqn: bad iSCSI name 'iqn.2026-01.Org.Example:x'",
        ),
        ("{iqn: iqn.2026-13.org.example}", "iscsi.iqn: bad iSCSI name"),
        ("{iqn: eui.0123}", "iscsi.iqn: bad iSCSI name 'eui.0123'"),
        ("{iqn: 'iqn.2026-01.org.x:a b'}", "iscsi.iqn: bad iSCSI name"),
        ("{iqn: 42}", "iscsi.iqn: expected a string, got integer"),
        ("{max_connections: 0}", "iscsi.max_connections: must be 1..1024, got 0"),
        ("{max_connections: 2000}", "iscsi.max_connections: must be 1..1024, got 2000"),
        ("{max_connections: '8'}", "iscsi.max_connections: expected an integer, got string"),
        ("{portal: x}", "iscsi.portal: unknown key"),
        ("'127.0.0.1:3260'", "iscsi: expected a mapping, got string"),
    ],
)
def test_iscsi_errors_name_the_key(tmp_path: Path, iscsi: str, expected: str) -> None:
    message = error_of(tmp_path, PRIMARY + f"iscsi: {iscsi}\n")
    assert message.startswith(expected), message


def test_an_iqn_longer_than_223_bytes_is_refused(tmp_path: Path) -> None:
    name = "iqn.2026-01.org.example:" + "x" * 200
    message = error_of(tmp_path, PRIMARY + f"iscsi: {{iqn: {name}}}\n")
    assert message == "iscsi.iqn: longer than 223 bytes", message


@pytest.mark.parametrize(("name", "port"), [("primary.yaml", 13260), ("secondary.yaml", 13261)])
def test_shipped_configs_serve_iscsi_on_loopback_off_the_standard_port(
    name: str, port: int, tmp_path: Path
) -> None:
    config = load_text(tmp_path, (REPO / "configs" / name).read_text())
    assert config.iscsi.listen == Address("127.0.0.1", port)  # make run prints these
    assert config.iscsi_iqn == "iqn.2026-01.org.journalpair:jg0"
