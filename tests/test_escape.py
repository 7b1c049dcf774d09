"""escape_path / unescape_path: tables, then systemd-escape itself as the oracle."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.escape import EscapeError, escape_path, unescape_path

SYSTEMD_ESCAPE = shutil.which("systemd-escape")
needs_systemd_escape = pytest.mark.skipif(
    SYSTEMD_ESCAPE is None, reason="systemd-escape (Debian package systemd) is not installed"
)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)})"


# (absolute path, its escaped name): both directions hold.
PAIRS = [
    ("/", "-"),
    ("/home", "home"),
    ("/usr/local", "usr-local"),
    ("/var/lib/flatpak", "var-lib-flatpak"),
    ("/fancy-dir", "fancy\\x2ddir"),
    ("/-", "\\x2d"),
    ("/.hidden", "\\x2ehidden"),
    ("/a/.b", "a-.b"),
    ("/a.", "a."),
    ("/...", "\\x2e.."),
    ("/a b", "a\\x20b"),
    ("/a\\b", "a\\x5cb"),
    ("/a:b_c", "a:b_c"),
    ("/ä", "\\xc3\\xa4"),
    ("/\N{SNOWMAN}", "\\xe2\\x98\\x83"),
    ("/a\udcff", "a\\xff"),  # the byte 0xff, as os.listdir hands it out
    ("/a\nb", "a\\x0ab"),
    ("/a-", "a\\x2d"),
    ("/a-/b", "a\\x2d-b"),
    ("/" + "a" * 255, "a" * 255),
    ("/" + "a/" * 2046 + "bc", "a-" * 2046 + "bc"),  # 4095 bytes, the longest path allowed
]

# Paths that escape to a name, but not by the plain inverse of unescaping.
ESCAPE_ONLY = [
    ("//", "-"),
    ("/./", "-"),
    ("/.", "-"),
    ("", "-"),
    ("/home/", "home"),
    ("//home/./x/", "home-x"),
    ("/a//b/", "a-b"),
    ("/a/.", "a"),
    ("/" + "/" * 5000 + "a", "a"),  # the length limit applies after simplification
    ("/a" + "/." * 3000, "a"),
    # Relative paths: systemd-escape warns but escapes them as if absolute.
    ("home", "home"),
    ("a/b", "a-b"),
    ("./a", "a"),
    (".a", "\\x2ea"),
]

ESCAPE_FAILURES = [
    (".", "current directory"),
    ("./", "current directory"),
    ("./.", "current directory"),
    ("..", "'..'"),
    ("/..", "'..'"),
    ("/a/..", "'..'"),
    ("/a/../b", "'..'"),
    ("../a", "'..'"),
    ("/" + "a" * 256, "longer than 255"),
    ("/a/" + "b" * 256 + "/c", "longer than 255"),
    ("/a" * 2048, "PATH_MAX"),  # 4096 bytes
    ("/a\0b", "NUL"),
    ("/\ud800", "surrogate"),
]

# Names systemd accepts though they are not the canonical escape of their path.
UNESCAPE_ONLY = [
    (".home", "/.home"),
    ("a\\x2Db", "/a-b"),
    ("a\\x2fb", "/a/b"),
    ("a\\x2Fb", "/a/b"),
    ("a b", "/a b"),
    ("lost+found", "/lost+found"),
    ("a\udcff", "/a\udcff"),
]

UNESCAPE_FAILURES = [
    ("", "empty"),
    ("-home", "starts with"),
    ("home-", "ends with"),
    ("\\x2fhome", "starts with"),
    ("home\\x2f", "ends with"),
    ("--", "starts with"),
    ("a--b", "empty component"),
    ("a\\x2f-b", "empty component"),
    (".", "'.' component"),
    ("a-.", "'.' component"),
    ("a-.-b", "'.' component"),
    ("..", "'..'"),
    ("a-..-b", "'..'"),
    ("\\x2e\\x2e", "'..'"),
    ("a\\", "offset 1"),
    ("a\\x", "offset 1"),
    ("a\\x2", "offset 1"),
    ("a\\X2f", "offset 1"),
    ("a\\x2g", "offset 1"),
    ("a\\y20", "offset 1"),
    ("a" * 256, "longer than 255"),
    ("a-" * 2047 + "bc", "PATH_MAX"),
    ("a\\x00b", "NUL byte"),
    ("a\0b", "NUL byte"),
]


@pytest.mark.parametrize(("path", "name"), PAIRS, ids=_short)
def test_pair(path: str, name: str) -> None:
    assert escape_path(path) == name
    assert unescape_path(name) == path


@pytest.mark.parametrize(("path", "name"), ESCAPE_ONLY, ids=_short)
def test_escape_only(path: str, name: str) -> None:
    assert escape_path(path) == name


@pytest.mark.parametrize(("name", "path"), UNESCAPE_ONLY, ids=_short)
def test_unescape_only(name: str, path: str) -> None:
    assert unescape_path(name) == path
    assert escape_path(path) != name


@pytest.mark.parametrize(("path", "reason"), ESCAPE_FAILURES, ids=_short)
def test_escape_failure(path: str, reason: str) -> None:
    with pytest.raises(EscapeError) as info:
        escape_path(path)
    assert reason in str(info.value)
    assert repr(path)[:40] in str(info.value)


@pytest.mark.parametrize(("name", "reason"), UNESCAPE_FAILURES, ids=_short)
def test_unescape_failure(name: str, reason: str) -> None:
    with pytest.raises(EscapeError) as info:
        unescape_path(name)
    assert reason in str(info.value)
    assert repr(name)[:40] in str(info.value)


def test_error_types() -> None:
    assert issubclass(EscapeError, PystateError)
    assert issubclass(EscapeError, ValueError)


# --- systemd-escape as the oracle -------------------------------------------------------
#
# systemd 252's systemd-escape takes several arguments and prints the results on one
# line separated by spaces; at the first failure it stops, leaving the results so far
# on stdout without a newline, and exits 1. Escaped names never contain a space, so a
# batch splits cleanly; unescaped paths may, and those inputs are asked one at a time.


def _systemd(args: list[bytes], unescape: bool) -> list[bytes | None]:
    """systemd-escape's answer for each argument: the output, or None if refused."""
    assert SYSTEMD_ESCAPE is not None
    flags = ["--unescape", "--path"] if unescape else ["--path"]
    results: list[bytes | None] = [None] * len(args)

    def call(indices: list[int]) -> None:
        while indices:
            proc = subprocess.run(
                [SYSTEMD_ESCAPE.encode(), *[f.encode() for f in flags], b"--"]
                + [args[i] for i in indices],
                capture_output=True,
                env={"LANG": "C.UTF-8", "SYSTEMD_LOG_LEVEL": "crit"},
                check=False,
            )
            if proc.returncode == 0:
                assert proc.stdout.endswith(b"\n")
                out = proc.stdout[:-1]
                parts = [out] if len(indices) == 1 else out.split(b" ")
                assert len(parts) == len(indices), (indices, proc.stdout)
                for i, part in zip(indices, parts, strict=True):
                    results[i] = part
                return
            assert proc.returncode == 1, proc
            done = proc.stdout.split(b" ") if proc.stdout else []
            for i, part in zip(indices, done, strict=False):
                results[i] = part
            # indices[len(done)] is the one that failed; its result stays None.
            indices = indices[len(done) + 1 :]

    batch = []
    for i, arg in enumerate(args):
        if unescape and (b" " in arg or b"\\x20" in arg.lower()):
            call([i])
        else:
            batch.append(i)
    call(batch)
    return results


def _ours(args: list[bytes], unescape: bool) -> list[bytes | None]:
    function = unescape_path if unescape else escape_path
    results: list[bytes | None] = []
    for arg in args:
        try:
            results.append(
                function(arg.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
            )
        except EscapeError:
            results.append(None)
    return results


def _check_against_systemd(args: list[bytes], unescape: bool) -> None:
    theirs = _systemd(args, unescape)
    ours = _ours(args, unescape)
    for arg, mine, real in zip(args, ours, theirs, strict=True):
        assert mine == real, (arg, mine, real)


@needs_systemd_escape
def test_tables_against_systemd() -> None:
    """Every table row above is what systemd-escape itself says (NUL rows aside)."""
    valid_paths = [p for p, _ in PAIRS + ESCAPE_ONLY]
    bad_paths = [p for p, _ in ESCAPE_FAILURES if "\0" not in p and "\ud800" not in p]
    paths = [p.encode("utf-8", "surrogateescape") for p in valid_paths + bad_paths]
    _check_against_systemd(paths, unescape=False)

    valid_names = [n for _, n in PAIRS] + [n for n, _ in UNESCAPE_ONLY]
    bad_names = [n for n, _ in UNESCAPE_FAILURES if "\0" not in n and "x00" not in n]
    names = [n.encode("utf-8", "surrogateescape") for n in valid_names + bad_names]
    _check_against_systemd(names, unescape=True)


@needs_systemd_escape
def test_escaped_nul_is_our_one_deviation() -> None:
    """systemd cuts the path at an escaped NUL; we refuse the name instead."""
    assert _systemd([b"a\\x00b", b"\\x00"], unescape=True) == [b"/a", b"/"]
    for name in ("a\\x00b", "\\x00"):
        with pytest.raises(EscapeError, match="NUL byte"):
            unescape_path(name)


# Pieces chosen to hit every rule: separators, dots, escapes good and bad, bytes
# that are not UTF-8, and characters that must be escaped.
_PATH_PIECES = [
    "/",
    "//",
    ".",
    "..",
    "a",
    "b.c",
    "-",
    "\\",
    "x",
    " ",
    "ä",
    "\udcff",
    ":_",
    "a" * 200,
]
_NAME_PIECES = [
    "-", "--", ".", "..", "a", "b.c", "\\", "\\x", "\\x2", "\\x2d", "\\x2D", "\\x2f", "\\x2F",
    "\\x2e", "\\x5c", "\\xff", "\\xc3\\xa4", "\\X41", "\\xg0", "x", " ", "\\x20", "ä", "\udcff",
    "a" * 200,
]  # fmt: skip

_paths = st.lists(st.sampled_from(_PATH_PIECES), max_size=12).map("".join)
_names = st.lists(st.sampled_from(_NAME_PIECES), max_size=12).map("".join)
_raw = st.binary(max_size=40).filter(lambda b: b"\0" not in b)
_oracle_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _encode(items: list[str]) -> list[bytes]:
    return [s.encode("utf-8", "surrogateescape") for s in items]


@needs_systemd_escape
@_oracle_settings
@given(st.lists(_paths, min_size=1, max_size=25), st.lists(_raw, max_size=10))
def test_escape_matches_systemd(paths: list[str], raw: list[bytes]) -> None:
    _check_against_systemd(_encode(paths) + raw, unescape=False)


@needs_systemd_escape
@_oracle_settings
@given(st.lists(_names, min_size=1, max_size=25), st.lists(_raw, max_size=10))
def test_unescape_matches_systemd(names: list[str], raw: list[bytes]) -> None:
    _check_against_systemd(_encode(names) + raw, unescape=True)


# --- round trips --------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.one_of(_paths, _raw.map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_round_trip_from_path(path: str) -> None:
    try:
        name = escape_path(path)
    except EscapeError:
        return
    assert name.isascii() and "/" not in name
    if path.startswith("/"):
        # What comes back is the path as systemd simplifies it.
        parts = [p for p in path.split("/") if p not in ("", ".")]
        assert unescape_path(name) == "/" + "/".join(parts)
    assert escape_path(unescape_path(name)) == name


@settings(max_examples=500)
@given(st.one_of(_names, _raw.map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_round_trip_from_name(name: str) -> None:
    try:
        path = unescape_path(name)
    except EscapeError:
        return
    assert path.startswith("/")
    canonical = escape_path(path)
    # One canonical name per path, and it maps back to the same path.
    assert unescape_path(canonical) == path
    assert escape_path(unescape_path(canonical)) == canonical
