"""Tests for pystate_initrd.config: tables (one helper, one line per case) and properties."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pystate_initrd.config import (
    DEFAULT_LAYOUT,
    MIN_IMAGE_SIZE,
    SETTINGS,
    Area,
    Config,
    ConfigError,
    LayoutEntry,
    MountMode,
    format_pcrs,
    format_size,
    load_config,
    parse_pcrs,
    parse_percent,
    parse_size,
    parse_state_device,
    parse_target,
    parse_weights,
    reference_markdown,
)
from pystate_initrd.errors import PystateError
from pystate_initrd.formats.cmdline import (
    CmdlineError,
    format_cmdline,
    parse_cmdline,
    split_cmdline,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "configuration.md"
M = 1 << 20

# --------------------------------------------------------------------------------------------
# The kernel command line


def check_cmdline_one(text: str, expected: list[tuple[str, str | None]] | None) -> None:
    if expected is None:
        with pytest.raises(CmdlineError):
            parse_cmdline(text)
    else:
        assert parse_cmdline(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("\n", []),
        (" \t\r\n ", []),
        ("quiet", [("quiet", None)]),
        ("ro root=/dev/sda1\n", [("ro", None), ("root", "/dev/sda1")]),
        ("  a \t b  ", [("a", None), ("b", None)]),
        ("a=", [("a", "")]),
        ("=b", [("", "b")]),
        ("a=b=c", [("a", "b=c")]),
        ('a="b c"', [("a", "b c")]),  # quote opening mid-word
        ('"a=b c"', [("a", "b c")]),  # quote around the whole word
        ('a="b c"d e', [("a", "b cd"), ("e", None)]),
        ('a=""', [("a", "")]),
        ('""', [("", None)]),  # an empty quoted word is still a word
        ("'a b'", [("a b", None)]),  # single quotes group too, as in systemd
        ('x="it\'s"', [("x", "it's")]),
        ("x='say \"hi\"'", [("x", 'say "hi"')]),
        ('a="b c', [("a", "b c")]),  # unterminated: runs to the end (EXTRACT_RELAX)
        ('a="b c\n', [("a", "b c\n")]),  # ... including the newline
        ('a\\"b c"', [("a\\b c", None)]),  # no backslash escapes (EXTRACT_RETAIN_ESCAPE)
        ("a\\ b", [("a\\", None), ("b", None)]),
        ("a\vb\fc", [("a\vb\fc", None)]),  # only space, tab, CR, LF separate
        ("é=ü ü", [("é", "ü"), ("ü", None)]),
        ("a\0b", None),
    ],
)
def test_parse_cmdline(text: str, expected: list[tuple[str, str | None]] | None) -> None:
    check_cmdline_one(text, expected)


_cmdline_key = st.text(st.characters(blacklist_characters="=\0"))
_cmdline_value = st.none() | st.text(st.characters(blacklist_characters="\0"))


@given(st.lists(st.tuples(_cmdline_key, _cmdline_value)))
def test_format_cmdline_round_trip(pairs: list[tuple[str, str | None]]) -> None:
    assert parse_cmdline(format_cmdline(pairs)) == pairs


@given(st.text())
def test_parse_cmdline_never_crashes(text: str) -> None:
    try:
        pairs = parse_cmdline(text)
    except CmdlineError:
        assert "\0" in text
    else:
        assert all("=" not in key for key, _ in pairs)


@given(st.text(st.characters(blacklist_characters="\"'\0")))
def test_split_cmdline_without_quotes_is_a_plain_split(text: str) -> None:
    words = text.replace("\t", " ").replace("\r", " ").replace("\n", " ").split(" ")
    assert split_cmdline(text) == [word for word in words if word]


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("a", "b")], "a=b"),
        ([("a", None), ("b", "")], "a b="),
        ([("a", "b c")], 'a="b c"'),
        ([("a b", None)], '"a b"'),
        ([("", None)], '""'),
        ([("a", 'x"y')], 'a="x"\'"\'"y"'),
    ],
)
def test_format_cmdline(pairs: list[tuple[str, str | None]], expected: str) -> None:
    assert format_cmdline(pairs) == expected


@pytest.mark.parametrize("pairs", [[("a=b", None)], [("a", "\0")]])
def test_format_cmdline_refuses(pairs: list[tuple[str, str | None]]) -> None:
    with pytest.raises(CmdlineError):
        format_cmdline(pairs)


# --------------------------------------------------------------------------------------------
# Value parsers: one helper, one line per case


def check_parse_one(parse: Any, text: str, expected: Any) -> None:
    if expected is ConfigError:
        with pytest.raises(ConfigError):
            parse(text)
    else:
        assert parse(text) == expected


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (parse_size, "0", 0),
        (parse_size, "4096", 4096),
        (parse_size, "256M", 256 * M),
        (parse_size, "256m", 256 * M),
        (parse_size, "256MiB", 256 * M),
        (parse_size, "1G", 1 << 30),
        (parse_size, "2T", 2 << 40),
        (parse_size, "8K", 8192),
        (parse_size, "10B", 10),
        (parse_size, " 1G ", 1 << 30),
        (parse_size, "", ConfigError),
        (parse_size, "M", ConfigError),
        (parse_size, "1.5G", ConfigError),
        (parse_size, "256MB", ConfigError),  # ambiguous: refuse rather than guess 10^6 or 2^20
        (parse_size, "-1", ConfigError),
        (parse_size, "1 G", ConfigError),
        (parse_size, "١٢", ConfigError),  # non-ASCII digits
        (parse_size, "1_000", ConfigError),
        (parse_pcrs, "7", (7,)),
        (parse_pcrs, "7+11", (7, 11)),
        (parse_pcrs, "0,7", (0, 7)),
        (parse_pcrs, "11+7,0", (0, 7, 11)),
        (parse_pcrs, "7+7", (7,)),
        (parse_pcrs, " 7 + 11 ", (7, 11)),
        (parse_pcrs, "23", (23,)),
        (parse_pcrs, "", ()),
        (parse_pcrs, "24", ConfigError),
        (parse_pcrs, "7+", ConfigError),
        (parse_pcrs, "+7", ConfigError),
        (parse_pcrs, "7++11", ConfigError),
        (parse_pcrs, "-1", ConfigError),
        (parse_pcrs, "seven", ConfigError),
        (parse_pcrs, "7 11", ConfigError),
        (parse_pcrs, "0x7", ConfigError),
        (parse_percent, "1%", 1.0),
        (parse_percent, "0.5%", 0.5),
        (parse_percent, "0%", 0.0),
        (parse_percent, "50%", 50.0),
        (parse_percent, "51%", ConfigError),
        (parse_percent, "1", ConfigError),
        (parse_percent, "%", ConfigError),
        (parse_percent, ".5%", ConfigError),
        (parse_percent, "1e2%", ConfigError),
        (parse_percent, "nan%", ConfigError),
        (parse_weights, "50:50", (50, 50)),
        (parse_weights, "1:3", (1, 3)),
        (parse_weights, " 2 : 1 ", (2, 1)),
        (parse_weights, "0:100", ConfigError),
        (parse_weights, "50", ConfigError),
        (parse_weights, "50:50:1", ConfigError),
        (parse_weights, "1001:1", ConfigError),
        (parse_state_device, "/dev/vda3", "/dev/vda3"),
        (parse_state_device, "/dev/disk/by-partlabel/state", "/dev/disk/by-partlabel/state"),
        (
            parse_state_device,
            "PARTUUID=24436126-BB50-47E3-B47B-21DBD57591C7",
            "PARTUUID=24436126-bb50-47e3-b47b-21dbd57591c7",
        ),
        (
            parse_state_device,
            "UUID=0b3b1c2a-3c7e-4d8e-9a51-7d1f5e2f0c11",
            "UUID=0b3b1c2a-3c7e-4d8e-9a51-7d1f5e2f0c11",
        ),
        (parse_state_device, "PARTUUID=24436126bb5047e3b47b21dbd57591c7", ConfigError),
        (parse_state_device, "PARTUUID=zz436126-bb50-47e3-b47b-21dbd57591c7", ConfigError),
        (parse_state_device, "partuuid=24436126-bb50-47e3-b47b-21dbd57591c7", ConfigError),
        (parse_state_device, "LABEL=state", ConfigError),
        (parse_state_device, "/dev/../etc/shadow", ConfigError),
        (parse_state_device, "/dev//vda3", ConfigError),
        (parse_state_device, "/dev/", ConfigError),
        (parse_state_device, "vda3", ConfigError),
        (parse_state_device, "", ConfigError),
        (parse_target, "/home", "/home"),
        (parse_target, "/var/lib/flatpak", "/var/lib/flatpak"),
        (parse_target, "/usr-local", "/usr-local"),  # not below /usr
        (parse_target, "/srv/my dir", "/srv/my dir"),
        (parse_target, "/", ConfigError),
        (parse_target, "home", ConfigError),
        (parse_target, "/home/", ConfigError),
        (parse_target, "//home", ConfigError),
        (parse_target, "/var/../etc", ConfigError),
        (parse_target, "/var/./lib", ConfigError),
        (parse_target, "/usr", ConfigError),
        (parse_target, "/usr/local", ConfigError),
        (parse_target, "/proc/x", ConfigError),
        (parse_target, "/run", ConfigError),
        (parse_target, "/state/x", ConfigError),
        (parse_target, "/sysroot", ConfigError),
        (parse_target, "/efi", ConfigError),
        (parse_target, "/boot/efi", ConfigError),
        (parse_target, "/lost+found", ConfigError),
        (parse_target, "/encrypted", ConfigError),
        (parse_target, "/encrypted.img.new", ConfigError),
        (parse_target, "/a\nb", ConfigError),
        (parse_target, "/" + "a" * 255, "/" + "a" * 255),
        (parse_target, "/" + "a" * 256, ConfigError),  # escaped name over NAME_MAX
        (parse_target, "/" + "-" * 64, ConfigError),  # each '-' escapes to \x2d
    ],
)
def test_parse_values(parse: Any, text: str, expected: Any) -> None:
    check_parse_one(parse, text, expected)


@given(st.integers(min_value=0, max_value=1 << 60))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.sampled_from([1 << 10, 1 << 20, 1 << 30, 1 << 40]), st.integers(1, 4096))
def test_size_formats_with_units(unit: int, count: int) -> None:
    assert format_size(unit * count)[-1] in "KMGT"


@given(st.lists(st.integers(0, 23), unique=True).map(sorted))
def test_pcrs_round_trip(pcrs: list[int]) -> None:
    assert parse_pcrs(format_pcrs(pcrs)) == tuple(pcrs)
    assert parse_pcrs(format_pcrs(pcrs).replace("+", ",")) == tuple(pcrs)


@given(st.text(max_size=30))
def test_value_parsers_raise_only_config_error(text: str) -> None:
    for parse in (parse_size, parse_pcrs, parse_percent, parse_weights, parse_target):
        with contextlib.suppress(ConfigError):
            parse(text)


def test_config_error_is_a_pystate_error() -> None:
    assert issubclass(ConfigError, PystateError)


# --------------------------------------------------------------------------------------------
# The settings table


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.field)
def test_setting_default_round_trips(setting: Any) -> None:
    if setting.default is not None:
        assert setting.parse(setting.show(setting.default)) == setting.default
    assert setting.section or setting.cmdline
    assert getattr(Config(), setting.field) == setting.default


def test_defaults() -> None:
    config = load_config(None, "")
    assert config == Config()
    assert config.enabled and not config.factory_reset and not config.debug
    assert config.factory_reset_request == "efi-variable"
    assert config.state_device is None
    assert config.layout == DEFAULT_LAYOUT
    assert [(e.target, e.area, e.mode, e.seed) for e in config.layout] == [
        ("/etc", "encrypted", "bind", True),
        ("/home", "plain", "bind", False),
        ("/var", "encrypted", "bind", True),
    ]
    assert config.plain_allowlist == frozenset({"/home"})
    assert config.pcrs == (7,) and config.pcr_bank == "sha256"
    assert config.policy_pcrs == (7, 15)
    assert config.measure_pcr15 and config.reseal_on_recovery
    assert config.weights == (50, 50)
    assert config.reserve_percent == 1.0 and config.reserve_min_bytes == 256 * M
    assert config.allocation == "full" and config.inner_fs == "ext4"
    assert config.min_image_size == MIN_IMAGE_SIZE
    assert config.recovery_tries == 3
    assert config.check_outer_fs
    assert config.warnings == ()
    assert dict(config.mount_modes) == {"/etc": "bind", "/home": "bind", "/var": "bind"}
    assert config.mount_mode("/srv") == MountMode.BIND


# --------------------------------------------------------------------------------------------
# load_config: one helper, one line per case. `expected` is a dict of Config attributes, or
# the error as a substring of its message.


def check_load_one(tmp_path: Path, conf: str | None, cmdline: str, expected: Any) -> None:
    path = tmp_path / "pystate.conf"
    if conf is not None:
        path.write_text(conf)
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as exc:
            load_config(path, cmdline)
        message = str(exc.value)
        assert expected in message, message
        assert "\n" not in message
    else:
        config = load_config(path, cmdline)
        for name, value in expected.items():
            assert getattr(config, name) == value, name


F = "pystate.conf"  # how error messages name the file (as a substring of the path)

LOAD_CASES: list[tuple[str | None, str, Any]] = [
    # The command line alone.
    (None, "", {"enabled": True, "source": None}),
    (None, "quiet splash root=/dev/vda2", {"enabled": True, "warnings": ()}),
    (None, "pystate=0", {"enabled": False}),
    (None, "pystate=no", {"enabled": False}),
    (None, "pystate=false", {"enabled": False}),
    (None, "pystate=off", {"enabled": False}),
    (None, "pystate", {"enabled": True}),
    (None, "pystate=1", {"enabled": True}),
    (None, "pystate=0 pystate=1", {"enabled": True}),
    (None, "pystate=maybe", "kernel command line: pystate=maybe: "),
    (None, "pystate=0 pystate.tpm2-pcrs=99", {"enabled": False}),  # the escape hatch
    ("[nonsense", "pystate=0", {"enabled": False}),  # ... also from a broken file
    (None, "pystate.debug", {"debug": True}),
    (None, "pystate.debug=1", {"debug": True}),
    (None, "pystate.debug=0", {"debug": False}),
    (None, "pystate.debug=yes pystate.debug=off", {"debug": False}),
    (None, "pystate.factory-reset=1", {"factory_reset": True}),
    (None, "pystate.factory_reset=1", {"factory_reset": True}),  # '_' as '-', like systemd
    (None, "pystate.factory-reset", "pystate.factory-reset: needs a value"),
    (None, "pystate.factory-reset pystate.factory-reset=0", {"factory_reset": False}),
    (None, "pystate.factory-reset=2", 'pystate.factory-reset=2: "2" is not a boolean'),
    (None, "pystate.tpm2-pcrs=7+11", {"pcrs": (7, 11), "policy_pcrs": (7, 11, 15)}),
    (None, "pystate.tpm2-pcrs=0,7", {"pcrs": (0, 7)}),
    (None, "pystate.tpm2-pcrs=", {"pcrs": (), "policy_pcrs": (15,)}),
    (None, "pystate.tpm2-pcrs=24", 'pystate.tpm2-pcrs=24: "24" is not a PCR index'),
    (None, "pystate.tpm2-pcrs=1 pystate.tpm2-pcrs=2", {"pcrs": (2,)}),  # later wins
    (None, "pystate.tpm2-pcrs=x pystate.tpm2-pcrs=2", {"pcrs": (2,)}),  # the loser is not read
    (None, "pystate.tpm2-pcrs", "pystate.tpm2-pcrs: needs a value"),
    (None, "pystate.state=/dev/vda3", {"state_device": "/dev/vda3"}),
    (None, '"pystate.state=/dev/disk/by-id/a b"', {"state_device": "/dev/disk/by-id/a b"}),
    (None, "pystate.state=LABEL=state", 'pystate.state=LABEL=state: "LABEL=state" is not'),
    (None, "pystate.state=", "pystate.state=: "),
    (
        None,
        "pystate.stat=/dev/vda3 pystate.Debug",
        {
            "warnings": (
                "kernel command line: unknown option pystate.stat=/dev/vda3 ignored",
                "kernel command line: unknown option pystate.Debug ignored",
            )
        },
    ),
    (None, "rd.pystate.debug pystatex=1 xpystate.debug", {"debug": False, "warnings": ()}),
    # The file alone.
    ("", "", {"source": "set"}),
    ("# only a comment\n", "", {"layout": DEFAULT_LAYOUT}),
    ("[tpm2]\npcrs = 7+11\n", "", {"pcrs": (7, 11)}),
    ("[tpm2]\npcrs = 0,7 # firmware and secure boot\n", "", {"pcrs": (0, 7)}),
    ("[tpm2]\nPCRS = 1\n", "", {"pcrs": (1,)}),  # keys are case-insensitive, as configparser's
    ("[tpm2]\npcrs =\n", "", {"pcrs": ()}),
    ("[tpm2]\npcr-bank = sha384\n", "", {"pcr_bank": "sha384"}),
    ("[tpm2]\npcr-bank = SHA1\n", "", {"pcr_bank": "sha1"}),
    ("[tpm2]\npcr-bank = md5\n", "", f'{F}:2: [tpm2] pcr-bank = "md5": "md5" is not one of'),
    ("[tpm2]\nmeasure-pcr15 = no\n", "", {"measure_pcr15": False, "policy_pcrs": (7,)}),
    (
        "[recovery]\nreseal = off\ntries = 5\n",
        "",
        {"reseal_on_recovery": False, "recovery_tries": 5},
    ),
    ("[recovery]\ntries = 11\n", "", f'{F}:2: [recovery] tries = "11": "11" is outside 0-10'),
    (
        "[image]\ninner-fs = btrfs\nallocation = sparse\n",
        "",
        {"inner_fs": "btrfs", "allocation": "sparse"},
    ),
    ("[image]\ninner-fs = xfs\n", "", f'{F}:2: [image] inner-fs = "xfs"'),
    ("[image]\nmin-size = 1G\n", "", {"min_image_size": 1 << 30}),
    ("[image]\nmin-size = 128M\n", "", f'{F}:2: [image] min-size = "128M": "128M" is below'),
    (
        "[resize]\nweights = 1:3\nreserve = 2%\nreserve-min = 1G\n",
        "",
        {"weights": (1, 3), "reserve_percent": 2.0, "reserve_min_bytes": 1 << 30},
    ),
    ("[resize]\nreserve = 2\n", "", f'{F}:2: [resize] reserve = "2": "2" is not a percentage'),
    ("[resize]\nweights = 0:1\n", "", f"{F}:2: [resize] weights"),
    ("[state]\ncheck-fs = no\n", "", {"check_outer_fs": False}),
    # Factory reset: the request it needs (SPEC §11.6); never from the command line it guards.
    ("", "", {"factory_reset_request": "efi-variable"}),
    ("[state]\nfactory-reset-request = none\n", "", {"factory_reset_request": "none"}),
    ("[state]\nfactory-reset-request = None\n", "", {"factory_reset_request": "none"}),
    (
        "[state]\nfactory-reset-request = no\n",
        "",
        f'{F}:2: [state] factory-reset-request = "no": "no" is not one of the choices; '
        "accepted: efi-variable | none",
    ),
    (
        None,
        "pystate.factory-reset=1 pystate.factory-reset-request=none",
        {
            "factory_reset": True,
            "factory_reset_request": "efi-variable",
            "warnings": (
                "kernel command line: unknown option pystate.factory-reset-request=none ignored",
            ),
        },
    ),
    (
        "[state]\nplain-allowlist = /home /srv\n  /var/lib/flatpak\n",
        "",
        {"plain_allowlist": frozenset({"/home", "/srv", "/var/lib/flatpak"})},
    ),
    (
        "[state]\nplain-allowlist = /srv\n",
        "",
        f'{F}:2: [state] plain-allowlist = "/srv": the default layout\'s [layout /home]: area = '
        "plain but /home is not on",
    ),
    ("[state]\nplain-allowlist =\n[layout /var]\n", "", {"plain_allowlist": frozenset()}),
    ("[state]\nplain-allowlist = /usr/local\n", "", f"{F}:2: [state] plain-allowlist"),
    # The command line overrides the file.
    ("[tpm2]\npcrs = 7+11\n", "pystate.tpm2-pcrs=0", {"pcrs": (0,)}),
    ("[tpm2]\npcrs = bad\n", "pystate.tpm2-pcrs=0", {"pcrs": (0,)}),
    # Layout sections.
    (
        "[layout /var/lib/flatpak]\n",
        "",
        {"layout": (LayoutEntry("/var/lib/flatpak", Area.ENCRYPTED, MountMode.BIND, True),)},
    ),
    (
        "[layout /var/lib/flatpak]\n[layout /var]\narea = encrypted\n[layout /etc]\n"
        "mode = overlay\n",
        "",
        {
            "layout": (
                LayoutEntry("/etc", Area.ENCRYPTED, MountMode.OVERLAY, False),
                LayoutEntry("/var", Area.ENCRYPTED, MountMode.BIND, True),
                LayoutEntry("/var/lib/flatpak", Area.ENCRYPTED, MountMode.BIND, True),
            ),
            "mount_modes": {"/etc": "overlay", "/var": "bind", "/var/lib/flatpak": "bind"},
        },
    ),
    (
        "[layout /home]\narea = plain\nseed = no\n",
        "",
        {"layout": (LayoutEntry("/home", Area.PLAIN, MountMode.BIND, False),)},
    ),
    ("[layout /srv]\narea = plain\n", "", f"{F}:1: [layout /srv]: area = plain but /srv is not"),
    ("[layout /etc]\nmode = overlay\nseed = yes\n", "", f"{F}:3: [layout /etc] seed = yes with"),
    ("[layout /etc]\nmode = union\n", "", f'{F}:2: [layout /etc] mode = "union": "union" is'),
    ("[layout /etc]\nsize = 1G\n", "", f'{F}:2: [layout /etc] unknown key "size"'),
    (
        "[layout /usr/local]\n",
        "",
        f'{F}:1: [layout /usr/local]: "/usr/local" can never be a target: '
        "target /usr/local is under forbidden /usr",
    ),
    ("[layout home]\n", "", '[layout home]: "home" is not a normalized absolute path'),
    ("[layout/etc]\n", "", "a layout section is [layout /absolute/target]"),
    ("[layout /etc/]\n", "", "is not a normalized absolute path"),
    ("[layout /etc]\n[layout  /etc]\n", "", f"{F}:2: [layout  /etc]: /etc already has a section"),
    # Malformed files.
    ("pcrs = 7\n", "", f"{F}:1: a setting before any [section]"),
    ("[tpm2]\npcrs = 7\n[tpm2]\n", "", f"{F}:3: section [tpm2] repeated"),
    ("[tpm2]\npcrs = 7\npcrs = 11\n", "", f"{F}:3: [tpm2] pcrs set twice"),
    ("[tpm2]\npcrs\n", "", f"{F}:2: not 'key = value'"),
    ("[tpm2]\npcrs: 7\n", "", f"{F}:2: not 'key = value'"),
    ("[tpm2]\nbank = sha256\n", "", f'{F}:2: [tpm2] unknown key "bank"; accepted: pcrs, pcr-bank'),
    ("[TPM2]\npcrs = 7\n", "", f"{F}:1: unknown section [TPM2]"),
    ("[DEFAULT]\npcrs = 7\n", "", f"{F}:1: unknown section [DEFAULT]"),
    ("[tpm2]\npcrs = %(x)s\n", "", f'{F}:2: [tpm2] pcrs = "%(x)s"'),  # no interpolation
]


@pytest.mark.parametrize(("conf", "cmdline", "expected"), LOAD_CASES)
def test_load_config(tmp_path: Path, conf: str | None, cmdline: str, expected: Any) -> None:
    if isinstance(expected, dict) and expected.get("source") == "set":
        expected = {**expected, "source": str(tmp_path / "pystate.conf")}
    check_load_one(tmp_path, conf, cmdline, expected)


def test_load_config_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, "")  # a directory
    (tmp_path / "bin.conf").write_bytes(b"[tpm2]\npcrs = \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.conf", "")
    (tmp_path / "big.conf").write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(tmp_path / "big.conf", "")


@given(st.text(max_size=200), st.text(max_size=100))
def test_load_config_raises_only_config_error(conf: str, cmdline: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pystate.conf"
        path.write_text(conf, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path, cmdline)
        except ConfigError as exc:
            assert "\n" not in str(exc)


# --------------------------------------------------------------------------------------------
# The documentation


def _docs_block(text: str, begin: str, end: str) -> str:
    start = text.index(begin) + len(begin)
    return text[start : text.index(end, start)]


def test_docs_reference_is_generated_from_the_table() -> None:
    text = DOCS.read_text()
    block = _docs_block(text, "<!-- BEGIN GENERATED REFERENCE -->\n", "<!-- END GENERATED")
    assert block == reference_markdown(), (
        "docs/configuration.md is stale; regenerate the block with "
        "python3 -c 'from pystate_initrd.config import reference_markdown as r; print(r())'"
    )


def test_docs_example_file(tmp_path: Path) -> None:
    example = _docs_block(DOCS.read_text(), "```ini\n", "```\n")
    path = tmp_path / "pystate.conf"
    path.write_text(example)
    config = load_config(path, "pystate.debug")
    assert config.debug
    assert config.inner_fs == "btrfs"
    assert config.pcrs == (0, 7) and config.pcr_bank == "sha256"
    assert config.weights == (1, 2)
    assert config.reserve_percent == 2.0 and config.reserve_min_bytes == 512 * M
    assert config.plain_allowlist == frozenset({"/home", "/var/lib/flatpak"})
    assert [(e.target, e.area, e.mode, e.seed) for e in config.layout] == [
        ("/etc", "encrypted", "overlay", False),
        ("/home", "plain", "bind", False),
        ("/opt", "encrypted", "bind", True),
        ("/var", "encrypted", "bind", True),
        ("/var/lib/flatpak", "plain", "bind", False),
    ]


def test_every_setting_is_read_by_the_program() -> None:
    # A documented setting that nothing reads is a lie in docs/configuration.md: every
    # Config field of SETTINGS must be read as cfg.<field> (or x.cfg.<field>) outside config.py.
    import ast

    package = Path(__file__).resolve().parent.parent / "pystate_initrd"
    read: set[str] = set()
    for path in package.rglob("*.py"):
        if path.name in ("config.py", "_linux_ffi.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Load)
                and (
                    (isinstance(node.value, ast.Name) and node.value.id == "cfg")
                    or (isinstance(node.value, ast.Attribute) and node.value.attr == "cfg")
                )
            ):
                read.add(node.attr)
    unread = sorted(s.field for s in SETTINGS if s.field not in read)
    assert unread == [], f"settings documented but read nowhere: {unread}"
