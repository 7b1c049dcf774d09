"""The mount plan: one table row per rule, properties over hostile entry sets, a real tree."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pystate_initrd.formats.escape import escape_path, unescape_path
from pystate_initrd.formats.plan import (
    FORBIDDEN_PREFIXES,
    RESERVED_TARGETS,
    Area,
    Entry,
    EntryKind,
    Mount,
    MountMode,
    MountPlan,
    PlanError,
    Rejection,
    is_reserved,
    plan_entries,
)
from pystate_initrd.initrd.state_tree import build_plan, scan_area

P, E = Area.PLAIN, Area.ENCRYPTED
DIR, LINK, FILE, OTHER = EntryKind.DIR, EntryKind.SYMLINK, EntryKind.FILE, EntryKind.OTHER
HOME = frozenset({"/home"})


def _entry(area: Area, name: str, kind: EntryKind = DIR) -> Entry:
    return Entry(area, name, kind, f"/state/{area}/{name}")


def _plan(
    *entries: Entry,
    allowlist: frozenset[str] = HOME,
    modes: dict[str, MountMode] | None = None,
) -> MountPlan:
    return plan_entries(entries, plain_allowlist=allowlist, modes=modes or {})


# --- one entry at a time --------------------------------------------------------------------

# (area, name, kind, expected target or None when rejected, reason fragment when rejected)
ONE = [
    (E, "home", DIR, "/home", None),
    (P, "home", DIR, "/home", None),
    (E, "var", DIR, "/var", None),
    (E, "var-lib-flatpak", DIR, "/var/lib/flatpak", None),
    (E, "usr-localx", DIR, "/usr/localx", "under forbidden /usr"),
    (E, "fancy\\x2ddir", DIR, "/fancy-dir", None),
    (E, "\\x2d", DIR, "/-", None),
    (E, "\\x2ehidden", DIR, "/.hidden", None),
    (E, "srv\\x20data", DIR, "/srv data", None),
    (E, "\\xc3\\xa4", DIR, "/ä", None),
    (E, "\\xe4", DIR, None, "not valid UTF-8"),
    (E, "a\\x0ab", DIR, None, "control character"),
    (E, "a\\x1b", DIR, None, "control character"),
    # The kind of entry.
    (E, "etc", LINK, None, "is a symbolic link"),
    (P, "home", LINK, None, "is a symbolic link"),
    (E, "etc", FILE, None, "is a regular file"),
    (E, "etc", OTHER, None, "is not a directory"),
    # Names that do not unescape.
    (E, "-", DIR, None, "target / is forbidden"),
    (E, "-etc", DIR, None, "starts with '-'"),
    (E, "etc-", DIR, None, "ends with '-'"),
    (E, "var--lib", DIR, None, "empty component"),
    (E, "--", DIR, None, "not a valid escaped path"),
    (E, "var\\x2f", DIR, None, "ends with '-' or an escaped '/'"),
    (E, "\\x2fetc", DIR, None, "starts with '-' or an escaped '/'"),
    (E, "var-..-etc", DIR, None, "'..'"),
    (E, "var-.-etc", DIR, None, "'.' component"),
    (E, "\\x2e\\x2e", DIR, None, "'..'"),
    (E, "a\\", DIR, None, "'\\' at offset 1"),
    (E, "a\\x0", DIR, None, "'\\' at offset 1"),
    (E, "a\\x00b", DIR, None, "NUL byte"),
    (E, "a\udcff", DIR, None, "not valid UTF-8"),
    (E, "\udcff", DIR, None, "not valid UTF-8"),
    (E, "a" * 256, DIR, None, "256 bytes long"),
    (E, "ä" * 128, DIR, None, "256 bytes long"),
    # Names that unescape but are not the one canonical name of their target.
    (E, "var\\x2flib", DIR, None, "not the canonical escape of /var/lib"),
    (E, "fancy\\x2Ddir", DIR, None, "not the canonical escape of /fancy-dir"),
    (E, "a\\x41", DIR, None, "not the canonical escape of /aA"),
    (E, "srv data", DIR, None, "canonical escape of /srv data (that is 'srv\\\\x20data')"),
    (E, "lost+found2", DIR, None, "not the canonical escape"),
    # Forbidden targets.
    (E, "usr", DIR, None, "target /usr is forbidden"),
    (E, "usr-lib", DIR, None, "target /usr/lib is under forbidden /usr"),
    (E, "proc", DIR, None, "target /proc is forbidden"),
    (E, "sys-kernel", DIR, None, "under forbidden /sys"),
    (E, "dev", DIR, None, "forbidden"),
    (E, "run-x", DIR, None, "under forbidden /run"),
    (E, "boot", DIR, None, "forbidden"),
    (E, "efi-EFI", DIR, None, "under forbidden /efi"),
    (E, "state", DIR, None, "target /state is forbidden"),
    (E, "sysroot-etc", DIR, None, "under forbidden /sysroot"),
    (E, "encrypted", DIR, None, "target /encrypted belongs to a reserved name"),
    (E, "encrypted.img", DIR, None, "reserved name"),
    (E, "encrypted.img.new", DIR, None, "reserved name"),
    (E, "lost\\x2bfound", DIR, None, "target /lost+found belongs to a reserved name"),
    # Prefixes match whole components only.
    (E, "usrx", DIR, "/usrx", None),
    (E, "var-usr", DIR, "/var/usr", None),
    (E, "encrypted-x", DIR, "/encrypted/x", None),
    (E, "runner", DIR, "/runner", None),
    # The plain allowlist.
    (P, "etc", DIR, None, "plain entry for /etc is not on the plain allowlist"),
    (P, "home-alice", DIR, None, "plain entry for /home/alice is not on the plain allowlist"),
    (P, "usr", DIR, None, "target /usr is forbidden"),
]


@pytest.mark.parametrize(("area", "name", "kind", "target", "reason"), ONE)
def test_one_entry(
    area: Area, name: str, kind: EntryKind, target: str | None, reason: str | None
) -> None:
    plan = _plan(_entry(area, name, kind))
    if reason is None:
        assert plan.rejected == ()
        (mount,) = plan.mounts
        assert (mount.area, mount.name, mount.target) == (area, name, target)
        assert mount.source == f"/state/{area}/{name}"
    else:
        assert plan.mounts == ()
        (rejection,) = plan.rejected
        assert (rejection.area, rejection.name) == (area, name)
        assert reason in rejection.reason


RESERVED = [
    (P, "encrypted.img", FILE),
    (P, "encrypted", DIR),
    (P, "encrypted.img.new", FILE),
    (P, "lost+found", DIR),
    (P, ".pystate", DIR),
    (P, ".home", DIR),
    (P, ".", DIR),
    (P, "..", DIR),
    (P, ".x", LINK),
    (E, ".pystate", DIR),
    (E, "lost+found", DIR),
    (E, ".anything", OTHER),
]


@pytest.mark.parametrize(("area", "name", "kind"), RESERVED)
def test_reserved_names_are_neither_mounted_nor_reported(
    area: Area, name: str, kind: EntryKind
) -> None:
    assert is_reserved(area, name)
    assert _plan(_entry(area, name, kind)) == MountPlan((), ())


@pytest.mark.parametrize("name", ["encrypted", "encrypted.img", "encrypted.img.new"])
def test_plain_reserved_names_are_reported_in_the_encrypted_area(name: str) -> None:
    (rejection,) = _plan(_entry(E, name)).rejected
    assert "reserved name" in rejection.reason


def test_entry_accepts_plain_strings() -> None:
    entry = Entry("plain", "etc", "symlink", "/state/etc")  # type: ignore[arg-type]
    assert entry.area is P and entry.kind is LINK
    with pytest.raises(ValueError):
        Entry("nowhere", "etc", "dir", "/state/etc")  # type: ignore[arg-type]
    assert _plan(Entry("plain", "etc", "dir", "/s/etc")).rejected == (  # type: ignore[arg-type]
        Rejection(P, "etc", "plain entry for /etc is not on the plain allowlist"),
    )


def test_home_gets_nosuid_nodev() -> None:
    plan = _plan(_entry(P, "home"), _entry(E, "var"), _entry(E, "home-alice"))
    options = {m.target: m.options for m in plan.mounts}
    assert options == {"/home": ("nosuid", "nodev"), "/var": (), "/home/alice": ()}


def test_modes_default_to_bind() -> None:
    plan = _plan(_entry(E, "var"), _entry(E, "etc"), modes={"/etc": MountMode.OVERLAY})
    assert {m.target: m.mode for m in plan.mounts} == {
        "/etc": MountMode.OVERLAY,
        "/var": MountMode.BIND,
    }


def test_allowlist_is_exact() -> None:
    allow = frozenset({"/home", "/srv/media"})
    plan = _plan(
        _entry(P, "srv-media"), _entry(P, "srv"), _entry(P, "srv-media-x"), allowlist=allow
    )
    assert [m.target for m in plan.mounts] == ["/srv/media"]
    assert sorted(r.name for r in plan.rejected) == ["srv", "srv-media-x"]


def test_forbidden_even_if_allowlisted() -> None:
    plan = _plan(_entry(P, "usr-local"), _entry(P, "-"), allowlist=frozenset({"/usr/local", "/"}))
    assert plan.mounts == ()
    assert {r.reason for r in plan.rejected} == {
        "target /usr/local is under forbidden /usr",
        "target / is forbidden",
    }


def test_same_target_in_both_areas_refuses_both() -> None:
    plan = _plan(_entry(P, "home"), _entry(E, "home"), _entry(E, "var"))
    assert [m.target for m in plan.mounts] == ["/var"]
    assert plan.rejected == (
        Rejection(E, "home", "target /home is claimed by both the plain and the encrypted area"),
        Rejection(P, "home", "target /home is claimed by both the plain and the encrypted area"),
    )


@pytest.mark.parametrize(
    ("plain", "why"),
    [
        (_entry(P, "etc"), "not on the plain allowlist"),
        (_entry(P, "etc", LINK), "is a symbolic link"),
        (_entry(P, "etc", FILE), "is a regular file"),
    ],
)
def test_a_rejected_plain_entry_cannot_suppress_an_encrypted_one(plain: Entry, why: str) -> None:
    """The plain area is attacker-writable: only a mountable plain entry conflicts."""
    plan = _plan(plain, _entry(E, "etc"))
    assert [(m.area, m.target) for m in plan.mounts] == [(E, "/etc")]
    (rejection,) = plan.rejected
    assert rejection.area is P and why in rejection.reason


def test_duplicate_entries_refuse_each_other() -> None:
    plan = _plan(_entry(E, "var"), Entry(E, "var", LINK, "/elsewhere/var"), _entry(P, "var"))
    assert plan.mounts == ()
    assert [r.reason for r in plan.rejected] == [
        "name appears more than once in the encrypted area",
        "name appears more than once in the encrypted area",
        "plain entry for /var is not on the plain allowlist",
    ]


def test_parents_before_children() -> None:
    names = ["var-lib-flatpak", "var", "home-alice-x", "a-b", "home", "var-lib", "b", "a"]
    plan = _plan(*(_entry(E, n) for n in names))
    assert [m.target for m in plan.mounts] == [
        "/a",
        "/b",
        "/home",
        "/var",
        "/a/b",
        "/var/lib",
        "/home/alice/x",
        "/var/lib/flatpak",
    ]


def test_to_json() -> None:
    plan = _plan(
        _entry(P, "home"),
        _entry(E, "etc"),
        _entry(E, "a\udcffb"),
        _entry(E, "x", LINK),
        modes={"/etc": MountMode.OVERLAY},
    )
    data = json.loads(json.dumps(plan.to_json(), ensure_ascii=False))
    assert data == {
        "mounts": [
            {
                "area": "encrypted",
                "name": "etc",
                "source": "/state/encrypted/etc",
                "target": "/etc",
                "mode": "overlay",
                "options": [],
            },
            {
                "area": "plain",
                "name": "home",
                "source": "/state/plain/home",
                "target": "/home",
                "mode": "bind",
                "options": ["nosuid", "nodev"],
            },
        ],
        "rejected": [
            {"area": "encrypted", "name": "a\\xffb", "reason": "name is not valid UTF-8"},
            {"area": "encrypted", "name": "x", "reason": "is a symbolic link"},
        ],
    }
    # Strict UTF-8 all the way: no lone surrogate leaks into the JSON text.
    json.dumps(plan.to_json(), ensure_ascii=False).encode("utf-8")


# --- properties over hostile entry sets -----------------------------------------------------

_HOSTILE_PIECES = [
    "-", "--", ".", "..", "\\x2e\\x2e", "\\x2e", "\\x2f", "\\x2F", "\\x2d", "\\x2D", "\\", "\\x",
    "\\x00", "\\xff", "\\xc3\\xa4", "\\x0a", " ", "+", "\udcff", "ä", "home", "etc", "var", "lib",
    "usr", "proc", "sysroot", "state", "run", "encrypted", "encrypted.img", "lost+found",
    ".pystate", "a" * 120, "x",
]  # fmt: skip
_SEGMENTS = ["home", "etc", "var", "lib", "flatpak", "usr", "local", "opt", "srv", "run", "proc",
             "state", "encrypted", "x-y", ".dot", "ä", "a b", "..."]  # fmt: skip

# Canonical names of plausible targets, so that plenty of entries do get mounted.
_canonical = st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=4).map(
    lambda parts: escape_path("/" + "/".join(parts))
)
_hostile = st.lists(st.sampled_from(_HOSTILE_PIECES), min_size=1, max_size=8).map("".join)
_long = st.integers(250, 300).map(lambda n: "a" * n)
_names = st.one_of(_canonical, _canonical, _hostile, _long)
_kinds = st.sampled_from([DIR, DIR, DIR, LINK, FILE, OTHER])
_entries = st.lists(
    st.builds(_entry, st.sampled_from([P, E]), _names, _kinds), max_size=30, unique=True
)
_allowlists = st.sets(
    st.sampled_from(["/home", "/etc", "/var", "/srv", "/usr", "/", "/home/x"]), max_size=4
).map(frozenset)
_modes = st.dictionaries(
    st.sampled_from(["/home", "/etc", "/var", "/opt", "/usr"]), st.sampled_from(list(MountMode))
)


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


@settings(max_examples=300, deadline=None)
@given(_entries, _allowlists, _modes, st.randoms(use_true_random=False))
def test_plan_properties(
    entries: list[Entry],
    allowlist: frozenset[str],
    modes: dict[str, MountMode],
    rnd: random.Random,
) -> None:
    plan = plan_entries(entries, plain_allowlist=allowlist, modes=modes)

    for i, mount in enumerate(plan.mounts):
        target = mount.target
        # A normalized absolute path that cannot leave the root.
        assert target.startswith("/") and target != "/"
        assert all(part not in ("", ".", "..") for part in target[1:].split("/"))
        assert not any(_is_under(target, p) for p in FORBIDDEN_PREFIXES)
        assert target not in RESERVED_TARGETS
        # Exactly one name per target, and it is this one.
        assert unescape_path(mount.name) == target and escape_path(target) == mount.name
        assert mount.area is E or target in allowlist
        assert mount.mode == modes.get(target, MountMode.BIND)
        assert mount.options == (("nosuid", "nodev") if target == "/home" else ())
        # Every mount that is a parent of this one was made before it.
        for j, other in enumerate(plan.mounts):
            if other.target != target and _is_under(target, other.target):
                assert j < i, (other.target, target)
    assert len({m.target for m in plan.mounts}) == len(plan.mounts)

    # Nothing silently dropped: each entry is mounted, reserved or rejected, exactly once.
    mounted = Counter((m.area, m.name, m.source) for m in plan.mounts)
    rejected = Counter((r.area, r.name) for r in plan.rejected)
    for entry in entries:
        key = (entry.area, entry.name)
        if is_reserved(entry.area, entry.name):
            assert key not in rejected and (*key, entry.source) not in mounted
        elif (*key, entry.source) in mounted:
            assert entry.kind is DIR and key not in rejected
        else:
            assert key in rejected
    reserved = sum(is_reserved(e.area, e.name) for e in entries)
    assert len(plan.mounts) + len(plan.rejected) + reserved == len(entries)
    assert all(r.reason for r in plan.rejected)

    # Deterministic: the order of the input does not matter.
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert plan_entries(shuffled, plain_allowlist=allowlist, modes=modes) == plan


@settings(max_examples=200, deadline=None)
@given(st.lists(_canonical, min_size=1, max_size=20, unique=True))
def test_valid_encrypted_entries_all_mount(names: list[str]) -> None:
    plan = _plan(*(_entry(E, n) for n in names))
    bad = {
        n
        for n in names
        if any(_is_under(unescape_path(n), p) for p in FORBIDDEN_PREFIXES)
        or unescape_path(n) in RESERVED_TARGETS
    }
    assert {m.name for m in plan.mounts} == set(names) - bad
    assert {r.name for r in plan.rejected} == bad


# --- a real tree ----------------------------------------------------------------------------


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    plain, enc = tmp_path / "state", tmp_path / "state" / "encrypted"
    outside = tmp_path / "outside"
    for d in (plain, enc, outside):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("home", "etc", "usr", "lost+found", ".pystate", "var-lib-x"):
        (plain / name).mkdir()
    (plain / "encrypted.img").write_bytes(b"")
    (plain / "encrypted.img.new").write_bytes(b"")
    (plain / "opt").write_text("a file where a directory belongs")
    os.symlink(outside, plain / "srv")  # a symlink to a real directory: still refused
    os.mkfifo(plain / "mnt")
    os.mkdir(os.fsencode(plain) + b"/\xff")  # not UTF-8
    for name in ("var", "var-lib-flatpak", "etc", "home", "usr-local", "lost+found", ".pystate"):
        (enc / name).mkdir()
    os.symlink("/", enc / "root")
    os.symlink("../../outside", enc / "var-lib-x")
    return plain, enc


def test_build_plan_on_a_real_tree(tmp_path: Path) -> None:
    plain, enc = _tree(tmp_path)
    plan = build_plan(plain, enc)
    assert plan.mounts == (
        Mount(E, "etc", str(enc / "etc"), "/etc", MountMode.BIND, ()),
        Mount(E, "var", str(enc / "var"), "/var", MountMode.BIND, ()),
        Mount(
            E,
            "var-lib-flatpak",
            str(enc / "var-lib-flatpak"),
            "/var/lib/flatpak",
            MountMode.BIND,
            (),
        ),
    )
    both = "target /home is claimed by both the plain and the encrypted area"
    assert plan.rejected == (
        Rejection(E, "home", both),
        Rejection(E, "root", "is a symbolic link"),
        Rejection(E, "usr-local", "target /usr/local is under forbidden /usr"),
        Rejection(E, "var-lib-x", "is a symbolic link"),
        Rejection(P, "etc", "plain entry for /etc is not on the plain allowlist"),
        Rejection(P, "home", both),
        Rejection(P, "mnt", "is not a directory"),
        Rejection(P, "opt", "is a regular file, not a directory"),
        Rejection(P, "srv", "is a symbolic link"),
        Rejection(P, "usr", "target /usr is forbidden"),
        Rejection(P, "var-lib-x", "plain entry for /var/lib/x is not on the plain allowlist"),
        Rejection(P, "\udcff", "name is not valid UTF-8"),
    )


def test_build_plan_plain_only(tmp_path: Path) -> None:
    plain, _ = _tree(tmp_path)
    plan = build_plan(plain, None, plain_allowlist=frozenset({"/home", "/var/lib/x"}))
    assert [(m.target, m.options) for m in plan.mounts] == [
        ("/home", ("nosuid", "nodev")),
        ("/var/lib/x", ()),
    ]
    assert plan.mounts[0].source == str(plain / "home")


def test_scan_area_kinds(tmp_path: Path) -> None:
    plain, enc = _tree(tmp_path)
    kinds = {e.name: e.kind for e in scan_area(plain, P)}
    assert kinds["home"] is DIR
    assert kinds["srv"] is LINK
    assert kinds["opt"] is FILE
    assert kinds["mnt"] is OTHER
    assert kinds["\udcff"] is DIR
    assert kinds["encrypted"] is DIR  # the encrypted area's mount point, reserved
    assert [e.name for e in scan_area(enc, E)] == sorted(os.listdir(enc))


def test_scan_area_relative_directory_gives_absolute_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    (entry,) = scan_area(Path("."), P)
    assert entry.source == str(tmp_path / "home")


def test_missing_directory_is_a_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot read the encrypted state directory"):
        build_plan(None, tmp_path / "nope")
