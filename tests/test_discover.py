"""Choosing the state partition (SPEC §2): the rules as a table, a never-guess
property, and the sysfs/efivars/superblock I/O on real loop devices and mkfs output."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pystate_initrd.formats.gpt import (
    GROW_FS,
    NO_AUTO,
    READ_ONLY,
    STATE_TYPE_GUID,
    GptTable,
    Partition,
)
from pystate_initrd.formats.repart import DEFAULT_SIZE_MIN, parse_size, size_min
from pystate_initrd.formats.resize_policy import human_size
from pystate_initrd.initrd.discover import (
    LOADER_PARTUUID_VARIABLE,
    DiscoverError,
    DiskInfo,
    Initrd,
    RepartFacts,
    Rule,
    StateChoice,
    StateNotFoundError,
    discover_state,
    disk_of_devnum,
    find_state_partition,
    initrd_kind,
    list_disks,
    parse_loader_variable,
    partition_node,
    partition_nodes,
    read_fs_uuid,
    read_loader_partuuid,
    repart_facts,
    root_disk_of,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts")

ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def U(n: int) -> uuid.UUID:
    return uuid.UUID(f"00000000-0000-4000-8000-{n:012x}")


def part(
    index: int, guid: uuid.UUID, type_guid: uuid.UUID = STATE_TYPE_GUID, attrs: int = 0
) -> Partition:
    first = 2048 * index
    return Partition(
        index, type_guid, guid, "", first, first + 2047, attrs, first * 512, 2048 * 512
    )


def disk(
    device: str, *parts: Partition, warning: str | None = None, nodes: dict[int, str] | None = None
) -> DiskInfo:
    table = GptTable(
        sector_size=512,
        disk_guid=uuid.uuid5(uuid.NAMESPACE_URL, device),
        partitions=tuple(parts),
        disk_size=1 << 30,
        first_usable_lba=34,
        last_usable_lba=(1 << 21) - 34,
        entry_count=128,
        entry_size=128,
        used_backup=warning is not None,
        warning=warning,
    )
    return DiskInfo(device, table, nodes or {})


A = disk("/dev/vda", part(1, U(1), ESP), part(2, U(2)))
B = disk("/dev/vdb", part(1, U(3)))
C = disk(
    "/dev/nvme0n1",
    part(1, U(4), ESP),
    part(2, U(5), attrs=NO_AUTO),
    part(3, U(6), attrs=READ_ONLY | GROW_FS),
)
D = disk("/dev/sda", part(1, U(7)), part(2, U(8)))
E = disk("/dev/sdb", part(1, U(9), LINUX))
A_CLONE = disk("/dev/vdc", part(1, U(1), ESP), part(2, U(2)))
ONLY_NO_AUTO = disk("/dev/vde", part(1, U(10), ESP), part(2, U(11), attrs=NO_AUTO))
DAMAGED = disk("/dev/vdf", part(4, U(12)), warning="primary GPT damaged (x); using the backup")
ODD_NODES = disk("/dev/vdg", part(2, U(13)), nodes={2: "/dev/odd-name2"})
X = uuid.UUID("4a3e1f7c-0d2b-4e8a-9c61-5f0b7d2e9a11")


@dataclass(frozen=True)
class Case:
    id: str
    disks: tuple[DiskInfo, ...]
    cmdline: str | None = None
    loader: uuid.UUID | None = None
    root: str | None = None
    fs_uuids: tuple[tuple[str, uuid.UUID], ...] = ()
    skipped: tuple[str, ...] = ()
    # expected: (device, rule, read_only, grow_fs, no_auto) or (error type, fragments)
    device: str | None = None
    rule: Rule | None = None
    flags: tuple[bool, bool, bool] = (False, False, False)
    error: type[DiscoverError] | None = None
    fragments: tuple[str, ...] = ()


S = str(STATE_TYPE_GUID)
CASES = [
    # 1: pystate.state= wins, whatever the other rules say
    Case("partuuid", (A, B), cmdline=f"PARTUUID={U(3)}", loader=U(1), root="/dev/vda",
         device="/dev/vdb1", rule=Rule.CMDLINE),
    Case("partuuid-upper", (A, B), cmdline=f"PARTUUID={str(U(3)).upper()}", device="/dev/vdb1",
         rule=Rule.CMDLINE),
    Case("partuuid-no-auto-reported", (C,), cmdline=f"PARTUUID={U(5)}", device="/dev/nvme0n1p2",
         rule=Rule.CMDLINE, flags=(False, False, True)),
    Case("partuuid-other-type", (E,), cmdline=f"PARTUUID={U(9)}", device="/dev/sdb1",
         rule=Rule.CMDLINE),
    Case("partuuid-flags", (C,), cmdline=f"PARTUUID={U(6)}", device="/dev/nvme0n1p3",
         rule=Rule.CMDLINE, flags=(True, True, False)),
    Case("partuuid-missing", (A, B), cmdline=f"PARTUUID={U(99)}", skipped=("/dev/sdz: no GPT",),
         error=StateNotFoundError,
         fragments=("no partition with that PARTUUID on /dev/vda, /dev/vdb",
                    "skipped: /dev/sdz: no GPT")),
    Case("partuuid-cloned", (A, A_CLONE), cmdline=f"PARTUUID={U(2)}", error=DiscoverError,
         fragments=(f"/dev/vda2 (PARTUUID {U(2)})", f"/dev/vdc2 (PARTUUID {U(2)})", "refusing")),
    Case("partuuid-bad", (A,), cmdline="PARTUUID=xyz", error=DiscoverError,
         fragments=("PARTUUID=xyz: not a UUID",)),
    Case("fs-uuid", (A, B), cmdline=f"UUID={X}", fs_uuids=(("/dev/vdb1", X), ("/dev/vda2", U(0))),
         device="/dev/vdb1", rule=Rule.CMDLINE),
    Case("fs-uuid-missing", (A, B), cmdline=f"UUID={X}", error=StateNotFoundError,
         fragments=("no partition with that UUID",)),
    Case("fs-uuid-twice", (A, B), cmdline=f"UUID={X}",
         fs_uuids=(("/dev/vdb1", X), ("/dev/vda2", X)), error=DiscoverError,
         fragments=("several partitions have that UUID", "/dev/vda2", "/dev/vdb1")),
    Case("path", (A, B), cmdline="/dev/vda2", device="/dev/vda2", rule=Rule.CMDLINE),
    Case("path-sysfs-node", (ODD_NODES,), cmdline="/dev/odd-name2", device="/dev/odd-name2",
         rule=Rule.CMDLINE),
    Case("path-outside-gpt", (A,), cmdline="/dev/md127", device="/dev/md127", rule=Rule.CMDLINE),
    Case("label-unsupported", (A,), cmdline="LABEL=state", error=DiscoverError,
         fragments=("expected PARTUUID=…, UUID=… or a /dev/ path",)),
    # 2: the boot loader's disk binds, even when other disks have state partitions
    Case("loader", (A, B), loader=U(1), root="/dev/vdb", device="/dev/vda2", rule=Rule.LOADER),
    Case("loader-skips-no-auto", (C, B), loader=U(4), device="/dev/nvme0n1p3", rule=Rule.LOADER,
         flags=(True, True, False)),
    Case("loader-disk-without-state", (E, B), loader=U(9), error=StateNotFoundError,
         fragments=(f"no partition of type {S} on /dev/sdb", "boot loader")),
    Case("loader-disk-only-no-auto", (ONLY_NO_AUTO, B), loader=U(10), error=StateNotFoundError,
         fragments=(f"ignored with the no-auto bit (63): /dev/vde2 (PARTUUID {U(11)})",)),
    Case("loader-two-on-disk", (D,), loader=U(7), error=DiscoverError,
         fragments=("2 state partitions on /dev/sda", f"/dev/sda1 (PARTUUID {U(7)})",
                    f"/dev/sda2 (PARTUUID {U(8)})")),
    Case("loader-absent", (A, B), loader=U(99), root="/dev/vda", error=StateNotFoundError,
         fragments=(f"LoaderDevicePartUUID {U(99)}) is on none of the disks: /dev/vda, /dev/vdb",)),
    Case("loader-cloned", (A, A_CLONE), loader=U(1), error=DiscoverError,
         fragments=("on several disks: /dev/vda, /dev/vdc",)),
    Case("loader-backup-warning", (DAMAGED,), loader=U(12), device="/dev/vdf4", rule=Rule.LOADER),
    # 3: the root file system's disk
    Case("root", (A, B), root="/dev/vdb", device="/dev/vdb1", rule=Rule.ROOT_DISK),
    Case("root-two-on-disk", (D, B), root="/dev/sda", error=DiscoverError,
         fragments=("2 state partitions on /dev/sda",)),
    Case("root-disk-without-state", (E, B), root="/dev/sdb", error=StateNotFoundError,
         fragments=(f"no partition of type {S} on /dev/sdb, the disk of the root file system",)),
    Case("root-disk-absent", (A, B), root="/dev/sdq", error=StateNotFoundError,
         fragments=("root file system's disk /dev/sdq",)),
    # 4: exactly one over all disks
    Case("only-one", (A, E), device="/dev/vda2", rule=Rule.ONLY_ONE),
    Case("only-one-besides-no-auto", (C, E), device="/dev/nvme0n1p3", rule=Rule.ONLY_ONE,
         flags=(True, True, False)),
    Case("several-disks", (A, B, E), error=DiscoverError,
         fragments=("2 state partitions and no rule", f"/dev/vda2 (PARTUUID {U(2)})",
                    f"/dev/vdb1 (PARTUUID {U(3)})")),
    Case("two-on-one-disk", (D,), error=DiscoverError, fragments=("/dev/sda1", "/dev/sda2")),
    Case("none", (E,), error=StateNotFoundError,
         fragments=(f"no partition of type {S} found on /dev/sdb",)),
    Case("only-no-auto", (ONLY_NO_AUTO,), error=StateNotFoundError, fragments=("/dev/vde",)),
    Case("no-disks", (), skipped=("/dev/sda: no GPT found",), error=StateNotFoundError,
         fragments=("found on no disk with a GPT (skipped: /dev/sda: no GPT found)",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rules(case: Case) -> None:
    fs = dict(case.fs_uuids)

    def run() -> StateChoice:
        return find_state_partition(
            case.disks,
            cmdline_state=case.cmdline,
            loader_partuuid=case.loader,
            root_disk=case.root,
            fs_uuid=fs.get,
            skipped=case.skipped,
        )

    if case.error is not None:
        with pytest.raises(case.error) as exc:
            run()
        assert type(exc.value) is case.error
        for fragment in case.fragments:
            assert fragment in str(exc.value)
        return
    choice = run()
    assert (choice.device, choice.rule) == (case.device, case.rule)
    assert (choice.read_only, choice.grow_fs, choice.no_auto) == case.flags
    if choice.partition is not None:
        assert choice.part_uuid == choice.partition.part_guid
        disk_of = {d.device: d for d in case.disks}[choice.disk or ""]
        assert choice.partition in disk_of.table.partitions
        assert choice.warnings == (
            (f"{disk_of.device}: {disk_of.table.warning}",) if disk_of.table.warning else ()
        )
    js = choice.to_json()
    assert js["device"] == choice.device and js["rule"] == choice.rule.name.lower()


def test_uuid_without_reader() -> None:
    with pytest.raises(DiscoverError, match="no way to read file system UUIDs"):
        find_state_partition((A,), cmdline_state=f"UUID={X}", loader_partuuid=None, root_disk=None)


@pytest.mark.parametrize(
    ("disk_path", "index", "node"),
    [
        ("/dev/vda", 2, "/dev/vda2"),
        ("/dev/sda", 10, "/dev/sda10"),
        ("/dev/nvme0n1", 2, "/dev/nvme0n1p2"),
        ("/dev/mmcblk0", 1, "/dev/mmcblk0p1"),
        ("/dev/loop7", 3, "/dev/loop7p3"),
    ],
)
def test_partition_node(disk_path: str, index: int, node: str) -> None:
    assert partition_node(disk_path, index) == node


# ---------------------------------------------------------------- never guess (property)

_TYPES = st.sampled_from([STATE_TYPE_GUID, STATE_TYPE_GUID, ESP, LINUX])
_ATTRS = st.sampled_from([0, 0, NO_AUTO, READ_ONLY, GROW_FS, READ_ONLY | GROW_FS | NO_AUTO])


@st.composite
def machines(draw: st.DrawFn) -> tuple[list[DiskInfo], uuid.UUID | None, str | None]:
    disks = []
    serial = 0
    for d in range(draw(st.integers(0, 4))):
        parts = []
        for i in draw(st.lists(st.integers(1, 6), max_size=4, unique=True)):
            serial += 1
            parts.append(part(i, U(serial), draw(_TYPES), draw(_ATTRS)))
        disks.append(disk(f"/dev/vd{'abcd'[d]}", *parts))
    guids = [p.part_guid for dd in disks for p in dd.table.partitions]
    loader = draw(st.none() | st.sampled_from(guids or [U(999)]) | st.just(U(998)))
    root = draw(st.none() | st.sampled_from([dd.device for dd in disks] + ["/dev/sdz"]))
    return disks, loader, root


@settings(max_examples=500, deadline=None)
@given(machine=machines())
def test_never_guesses(machine: tuple[list[DiskInfo], uuid.UUID | None, str | None]) -> None:
    disks, loader, root = machine

    def candidates(d: DiskInfo) -> list[Partition]:
        return [p for p in d.table.partitions if p.is_state and not p.no_auto]

    if loader is not None:
        scope = [d for d in disks if any(p.part_guid == loader for p in d.table.partitions)]
    elif root is not None:
        scope = [d for d in disks if d.device == root]
    else:
        scope = disks
    found = [(d, p) for d in scope for p in candidates(d)]
    try:
        choice = find_state_partition(
            disks, cmdline_state=None, loader_partuuid=loader, root_disk=root
        )
    except StateNotFoundError:
        assert not found
        return
    except DiscoverError as exc:
        assert len(found) >= 2
        for d, p in found:  # every candidate named, with its PARTUUID
            assert f"{d.node(p.index)} (PARTUUID {p.part_guid})" in str(exc)
        return
    assert [(choice.disk, choice.partition)] == [(d.device, p) for d, p in found]
    assert choice.partition is not None and choice.partition.is_state
    assert not choice.no_auto
    expected_rule = Rule.LOADER if loader else Rule.ROOT_DISK if root else Rule.ONLY_ONE
    assert choice.rule is expected_rule


# ---------------------------------------------------------------- no state partition: what to do

GIB, MIB = 1 << 30, 1 << 20
SHIPPED = "/sysroot/usr/lib/repart.d/50-pystate-state.conf"
SYSTEMD_1G = RepartFacts(Initrd.SYSTEMD, definition=SHIPPED, size_min=GIB)
# E: one 1 MiB partition at LBA 2048 on a 1 GiB disk, so 1022 MiB free after it.
FULL = disk("/dev/vdh", Partition(1, LINUX, U(20), "", 34, (1 << 21) - 34, 0, 34 * 512, 0))
E_FREE = "its largest unpartitioned extent is 1022 MiB"


@dataclass(frozen=True)
class Missing:
    id: str
    facts: RepartFacts | None
    fragments: tuple[str, ...]
    hint: str | None  # a fragment of the hint; None: no hint at all
    disks: tuple[DiskInfo, ...] = (E, B)
    loader: uuid.UUID | None = None
    root: str | None = "/dev/sdb"


MISSING = [
    Missing("no-facts", None, (f"no partition of type {S} on /dev/sdb", E_FREE), None),
    Missing("shell", RepartFacts(Initrd.SHELL), (E_FREE,),
            "this initrd has no systemd-repart to make one: create the state partition when "
            "the disk is made"),
    Missing("no-definition", RepartFacts(Initrd.SYSTEMD), (E_FREE,),
            "systemd-repart makes it only from /usr/lib/repart.d/50-pystate-state.conf in the "
            "OS image, and /sysroot has none: install pystate in the OS image"),
    Missing("masked", RepartFacts(Initrd.SYSTEMD, definition="/sysroot/etc/repart.d/x.conf",
                                  masked=True), (E_FREE,),
            "but /sysroot/etc/repart.d/x.conf masks it"),
    Missing("below-minimum", SYSTEMD_1G, (E_FREE,),
            f"systemd-repart makes it from {SHIPPED} only with SizeMinBytes=1 GiB free in one "
            "piece, so it touched nothing: free or add disk space, or lower SizeMinBytes="),
    Missing("room-enough", RepartFacts(Initrd.SYSTEMD, definition=SHIPPED, size_min=512 * MIB),
            (E_FREE,),
            f"systemd-repart should have made it from {SHIPPED}: see journalctl -b -u "
            "systemd-repart; it must run after sysroot.mount and before pystate.service"),
    Missing("unknown-minimum", RepartFacts(Initrd.SYSTEMD, definition=SHIPPED), (E_FREE,),
            "should have made it"),
    Missing("full-disk", SYSTEMD_1G, ("on /dev/vdh", "; it has no unpartitioned space"),
            "only with SizeMinBytes=1 GiB free in one piece", disks=(FULL,), root="/dev/vdh"),
    Missing("loader-disk-is-root-disk", SYSTEMD_1G, ("the disk of the boot loader's partition",
                                                     E_FREE),
            "so it touched nothing", loader=U(9)),
    Missing("loader-disk-is-not-root-disk", SYSTEMD_1G, (E_FREE,),
            "systemd-repart adds partitions only to the root file system's disk /dev/vdb: "
            "create the state partition on /dev/sdb when the disk is made", loader=U(9),
            root="/dev/vdb"),
    Missing("loader-disk-shell", RepartFacts(Initrd.SHELL), (E_FREE,), "no systemd-repart",
            loader=U(9), root="/dev/vdb"),
    Missing("root-disk-without-gpt", SYSTEMD_1G,
            ("the root file system's disk /dev/sdq has no GPT with a state partition",),
            "systemd-repart adds partitions only to a disk that has a GPT already",
            root="/dev/sdq"),
    Missing("root-disk-without-gpt-shell", RepartFacts(Initrd.SHELL), ("/dev/sdq has no GPT",),
            "this initrd has no systemd-repart", root="/dev/sdq"),
    Missing("root-disk-without-gpt-no-facts", None, ("/dev/sdq has no GPT",), None,
            root="/dev/sdq"),
]  # fmt: skip


@pytest.mark.parametrize("case", MISSING, ids=[c.id for c in MISSING])
def test_no_state_partition_says_what_to_do(case: Missing) -> None:
    with pytest.raises(StateNotFoundError) as exc:
        find_state_partition(
            case.disks,
            cmdline_state=None,
            loader_partuuid=case.loader,
            root_disk=case.root,
            repart=case.facts,
        )
    text = str(exc.value)
    for fragment in case.fragments:
        assert fragment in text
    if case.hint is None:
        assert exc.value.hint is None
    else:
        assert exc.value.hint is not None and case.hint in exc.value.hint
        assert text.endswith(f" ({exc.value.hint})")  # one console line: message (hint)
    assert "\n" not in text


@settings(max_examples=300, deadline=None)
@given(
    used=st.integers(0, (1 << 21) - 34 - 2048),
    minimum=st.integers(1, 2 * GIB),
    initrd=st.sampled_from(Initrd),
)
def test_touched_nothing_iff_below_the_minimum(used: int, minimum: int, initrd: Initrd) -> None:
    """One partition of `used` sectors from LBA 2048: the hint blames the minimum exactly when
    the largest free extent is below it; the message's size is that extent's."""
    parts = (Partition(1, LINUX, U(1), "", 2048, 2047 + used, 0, 2048 * 512, used * 512),)
    one = disk("/dev/vda", *parts[: 1 if used else 0])
    tail = ((1 << 21) - 34) - (2048 + used) + 1
    largest = (max(tail, 2048 - 34) if used else (1 << 21) - 34 - 34 + 1) * 512
    facts = RepartFacts(initrd, definition=SHIPPED, size_min=minimum)
    with pytest.raises(StateNotFoundError) as exc:
        find_state_partition((one,), cmdline_state=None, loader_partuuid=None,
                             root_disk="/dev/vda", repart=facts)  # fmt: skip
    assert f"its largest unpartitioned extent is {human_size(largest)}" in str(exc.value)
    hint = exc.value.hint or ""
    if initrd is Initrd.SHELL:
        assert "no systemd-repart" in hint
    else:
        assert ("so it touched nothing" in hint) == (largest < minimum)
        assert ("should have made it" in hint) == (largest >= minimum)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1G", GIB),
        ("1024M", GIB),
        ("1.5G", GIB + GIB // 2),
        ("1073741824", GIB),
        ("1000", 4096),  # rounded up to 4096, as systemd-repart does
        (" 2T ", 2 << 40),
        ("512K", 512 << 10),
        ("1GB", GIB),
        ("", None),
        ("1 G 512M", None),
        ("-1G", None),
        ("1Gi", None),
        ("lots", None),
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[Partition]\nType=x\nSizeMinBytes=1G\n", GIB),
        ("[Partition]\nSizeMinBytes=1G\nSizeMinBytes=2G\n", 2 * GIB),  # the last one wins
        ("[Partition]\nSizeMinBytes=1G\nSizeMinBytes=\n", DEFAULT_SIZE_MIN),  # reset
        ("[Partition]\nType=x\n", DEFAULT_SIZE_MIN),
        ("[Other]\nSizeMinBytes=5G\n[Partition]\nType=x\n", DEFAULT_SIZE_MIN),
        ("# SizeMinBytes=5G\n[Partition]\n; SizeMinBytes=6G\n  SizeMinBytes = 3G \n", 3 * GIB),
        ("[Partition]\nSizeMinBytes=huge\n", None),
    ],
)
def test_size_min(text: str, expected: int | None) -> None:
    assert size_min(text) == expected


REPO_DEFINITION = (
    Path(__file__).resolve().parent.parent / "dracut-module/repart.d/50-pystate-state.conf"
)


def test_repart_facts_read_the_os_image(tmp_path: Path) -> None:
    root = tmp_path / "sysroot"
    shipped = root / "usr/lib/repart.d/50-pystate-state.conf"
    assert repart_facts(root, Initrd.SYSTEMD) == RepartFacts(Initrd.SYSTEMD, str(root))
    assert repart_facts(root, Initrd.SHELL) == RepartFacts(Initrd.SHELL, str(root))
    shipped.parent.mkdir(parents=True)
    shutil.copy(REPO_DEFINITION, shipped)
    facts = repart_facts(root, Initrd.SYSTEMD)
    assert (facts.definition, facts.masked, facts.size_min) == (str(shipped), False, GIB)
    assert repart_facts(root, Initrd.SHELL).definition is None  # a shell initrd never looks
    # a file of the same name in /etc replaces the shipped one as a whole
    override = root / "etc/repart.d/50-pystate-state.conf"
    override.parent.mkdir(parents=True)
    override.write_text("[Partition]\nType=24436126-bb50-47e3-b47b-21dbd57591c7\nSizeMinBytes=4G\n")
    facts = repart_facts(root, Initrd.SYSTEMD)
    assert (facts.definition, facts.size_min) == (str(override), 4 * GIB)
    override.write_text("")
    assert repart_facts(root, Initrd.SYSTEMD).masked
    override.unlink()
    override.symlink_to("/dev/null")
    facts = repart_facts(root, Initrd.SYSTEMD)
    assert (facts.definition, facts.masked) == (str(override), True)


def test_initrd_kind(tmp_path: Path) -> None:
    assert initrd_kind(tmp_path) is Initrd.SYSTEMD
    assert initrd_kind(tmp_path / "absent") is Initrd.SHELL
    (tmp_path / "file").touch()
    assert initrd_kind(tmp_path / "file") is Initrd.SHELL


# ---------------------------------------------------------------- EFI variable

LOADER_UUID = uuid.UUID("6a9bc6d2-5e5a-4b7c-8a2f-0123456789ab")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x06\0\0\0" + str(LOADER_UUID).upper().encode("utf-16-le") + b"\0\0", LOADER_UUID),
        (b"\x06\0\0\0" + str(LOADER_UUID).encode("utf-16-le"), LOADER_UUID),
        (b"\x07\0\0\0" + str(LOADER_UUID).encode("utf-16-le") + b"\0\0junk", LOADER_UUID),
        (b"\x06\0\0\0" + b"not a uuid".ljust(20, b"\0"), None),
        (b"\x06\0\0\0" + str(LOADER_UUID).encode("utf-16-le")[:-1], None),  # odd length
        (b"\x06\0\0\0", None),
        (b"", None),
        (b"\x06\0\0\0" + str(LOADER_UUID).encode(), None),  # UTF-8, not UTF-16
    ],
)
def test_parse_loader_variable(raw: bytes, expected: uuid.UUID | None) -> None:
    if expected is None:
        with pytest.raises(DiscoverError, match=LOADER_PARTUUID_VARIABLE):
            parse_loader_variable(raw)
    else:
        assert parse_loader_variable(raw) == expected


def test_read_loader_partuuid(tmp_path: Path) -> None:
    assert read_loader_partuuid(tmp_path / "absent") is None
    assert read_loader_partuuid(tmp_path) is None
    (tmp_path / LOADER_PARTUUID_VARIABLE).write_bytes(
        b"\x06\0\0\0" + str(LOADER_UUID).upper().encode("utf-16-le") + b"\0\0"
    )
    assert read_loader_partuuid(tmp_path) == LOADER_UUID


# ---------------------------------------------------------------- file-system UUIDs from real mkfs


@pytest.mark.parametrize(
    ("fstype", "size_mib", "argv"),
    [
        ("ext4", 8, ["mkfs.ext4", "-q", "-F", "-U", "{u}"]),
        ("btrfs", 120, ["mkfs.btrfs", "-q", "-f", "-U", "{u}"]),
        ("xfs", 300, ["mkfs.xfs", "-q", "-f", "-m", "uuid={u}"]),
    ],
)
def test_fs_uuid_from_mkfs(tmp_path: Path, fstype: str, size_mib: int, argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed")
    image = tmp_path / f"{fstype}.img"
    with image.open("wb") as f:
        f.truncate(size_mib << 20)
    wanted = uuid.uuid4()
    subprocess.run(
        [a.format(u=wanted) for a in argv] + [str(image)], check=True, capture_output=True
    )
    assert read_fs_uuid(image) == wanted


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 70_000, b"\x53\xef" * 10, os.urandom(1000)],
    ids=["empty", "zeros", "magic-only", "random"],
)
def test_fs_uuid_none(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x").write_bytes(content)
    assert read_fs_uuid(tmp_path / "x") is None
    assert read_fs_uuid(tmp_path / "absent") is None


# ---------------------------------------------------------------- sysfs, mounts: a real loop disk


def _run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class LoopDisk:
    name: str  # loopN
    esp: uuid.UUID
    state: uuid.UUID
    root: uuid.UUID
    state_fs: uuid.UUID
    sysroot: Path


@contextlib.contextmanager
def loop_disk(tmp: Path) -> Iterator[LoopDisk]:
    esp, state, root, state_fs = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    image = tmp / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    _run(
        "sfdisk", "-q", str(image),
        stdin=(
            f"label: gpt\n\nsize=8M, type={ESP}, uuid={esp}\n"
            f"size=16M, type={STATE_TYPE_GUID}, uuid={state}, name=state, attrs=\"GUID:59\"\n"
            f"size=16M, type={LINUX}, uuid={root}\n"
        ),
    )  # fmt: skip
    dev = _run("losetup", "--show", "-f", "-P", str(image)).strip()
    sysroot = tmp / "sysroot"
    sysroot.mkdir()
    mounted = False
    try:
        # This kernel's own partition scan may not know GPT; partx adds them from userspace.
        subprocess.run(["partx", "-a", dev], capture_output=True, check=False)
        for _ in range(100):
            if all(os.path.exists(f"{dev}p{i}") for i in (1, 2, 3)):
                break
            time.sleep(0.02)
        _run("mkfs.ext4", "-q", "-U", str(state_fs), f"{dev}p2")
        _run("mkfs.ext4", "-q", f"{dev}p3")
        _run("mount", "-o", "ro", f"{dev}p3", str(sysroot))
        mounted = True
        yield LoopDisk(os.path.basename(dev), esp, state, root, state_fs, sysroot)
    finally:
        if mounted:
            subprocess.run(["umount", str(sysroot)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopDisk]:
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices and mounts")
    with loop_disk(tmp_path_factory.mktemp("loopdisk")) as ld:
        yield ld


@needs_root
def test_sysfs_enumeration(loop: LoopDisk) -> None:
    assert loop.name in list_disks(include_virtual=True)
    assert not any(n.startswith(("loop", "ram", "zram")) for n in list_disks())
    assert not any(n.startswith(f"{loop.name}p") for n in list_disks(include_virtual=True))
    assert partition_nodes(loop.name) == {i: f"/dev/{loop.name}p{i}" for i in (1, 2, 3)}


@needs_root
def test_disk_of_devices(loop: LoopDisk, tmp_path: Path) -> None:
    for node in (f"/dev/{loop.name}p2", f"/dev/{loop.name}"):
        rdev = os.stat(node).st_rdev
        assert disk_of_devnum(os.major(rdev), os.minor(rdev)) == f"/dev/{loop.name}"
    assert disk_of_devnum(0, 0) is None
    assert root_disk_of(loop.sysroot) == f"/dev/{loop.name}"
    assert root_disk_of(tmp_path) is None  # not a mount point


@needs_root
def test_discover_by_root_disk(loop: LoopDisk, tmp_path: Path) -> None:
    # The loop disk is not scanned as such (virtual), but as the root's disk it is.
    choice = discover_state(None, sysroot=loop.sysroot, efivars=tmp_path / "none")
    assert (choice.device, choice.rule) == (f"/dev/{loop.name}p2", Rule.ROOT_DISK)
    assert choice.part_uuid == loop.state and choice.grow_fs and not choice.read_only


@needs_root
def test_discover_by_loader(loop: LoopDisk, tmp_path: Path) -> None:
    (tmp_path / LOADER_PARTUUID_VARIABLE).write_bytes(
        b"\x06\0\0\0" + str(loop.esp).upper().encode("utf-16-le") + b"\0\0"
    )
    choice = discover_state(None, sysroot=tmp_path, efivars=tmp_path, include_virtual=True)
    assert (choice.device, choice.rule) == (f"/dev/{loop.name}p2", Rule.LOADER)


@needs_root
@pytest.mark.parametrize("how", ["partuuid", "uuid", "path", "symlink"])
def test_discover_by_cmdline(loop: LoopDisk, tmp_path: Path, how: str) -> None:
    link = tmp_path / "by-partlabel-state"
    link.symlink_to(f"/dev/{loop.name}p2")
    spec = {
        "partuuid": f"PARTUUID={loop.state}",
        "uuid": f"UUID={loop.state_fs}",
        "path": f"/dev/{loop.name}p2",
        "symlink": str(link),
    }[how]
    choice = discover_state(spec, include_virtual=True, efivars=tmp_path / "none")
    assert (choice.device, choice.rule, choice.part_uuid) == (
        f"/dev/{loop.name}p2",
        Rule.CMDLINE,
        loop.state,
    )


@needs_root
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{mm} / /with\\040space rw - ext4 {p3} rw", True),
        ("0:44 / /with\\040space rw shared:1 - btrfs {p3} rw", True),  # anonymous dev, btrfs-style
        ("0:30 / /with\\040space rw - tmpfs tmpfs rw", False),
        ("0:44 / /with\\040space rw - btrfs /dev/does-not-exist rw", False),
        ("{mm} / /elsewhere rw - ext4 {p3} rw", False),
    ],
)
def test_root_disk_from_mountinfo(
    loop: LoopDisk, tmp_path: Path, line: str, expected: bool
) -> None:
    p3 = f"/dev/{loop.name}p3"
    rdev = os.stat(p3).st_rdev
    mm = f"{os.major(rdev)}:{os.minor(rdev)}"
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 27 0:21 / /proc rw - proc proc rw\n99 1 " + line.format(mm=mm, p3=p3) + "\n"
    )
    got = root_disk_of("/with space", mountinfo_path=info)
    assert got == (f"/dev/{loop.name}" if expected else None)
