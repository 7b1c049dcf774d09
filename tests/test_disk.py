"""build.py disk: GPT layout checked with sfdisk --json, each file system fsck-clean and holding
the source tree with owners, modes and symlinks (mounted read-only through an offset loop device).
No QEMU; the whole file runs in a few seconds."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root

from pystate_build import disk
from pystate_build.disk import MiB, build_disk, parse_attr, parse_size

pytestmark = [pytest.mark.root, needs_root]


# --- pure helpers as tables -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536", 65536),
        ("384M", 384 * MiB),
        ("384MiB", 384 * MiB),
        ("1G", 1 << 30),
        ("2k", 2048),
        ("", None),
        ("12X", None),
        ("-1M", None),
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(disk.DiskError):
            parse_size(text)
    else:
        assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("no-auto", 63), ("read-only", 60), ("grow-file-system", 59), ("48", 48), ("64", None)],
)
def test_parse_attr(text: str, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(disk.DiskError):
            parse_attr(text)
    else:
        assert parse_attr(text) == expected


@pytest.mark.parametrize(
    ("bits", "expected"),
    [((60,), "GUID:60"), ((63, 59, 60), "GUID:59,60,63"), ((0, 60), "RequiredPartition GUID:60")],
)
def test_attrs_text(bits: tuple[int, ...], expected: str) -> None:
    assert disk._attrs_text(bits) == expected


# --- fixtures -----------------------------------------------------------------------------------


def make_state_tree(base: Path) -> Path:
    """A state tree exercising owners, modes (setgid, sticky), symlinks and odd names."""
    src = base / "state"
    (src / "home/alice/.config").mkdir(parents=True)
    (src / "home/alice/notes.txt").write_text("alice's notes\n")
    (src / "home/alice/big.bin").write_bytes(os.urandom(1 << 20))
    (src / "home/alice/empty").touch()
    for path in [src / "home/alice", *(src / "home/alice").rglob("*")]:
        os.lchown(path, 1000, 1000)
    os.chmod(src / "home/alice", 0o700)
    os.chmod(src / "home/alice/notes.txt", 0o640)
    os.chown(src / "home/alice/notes.txt", 1000, 1001)
    (src / "var-lib-flatpak/repo").mkdir(parents=True)
    (src / "var-tmp").mkdir()
    os.chmod(src / "var-tmp", 0o1777)
    (src / "srv").mkdir()
    os.chmod(src / "srv", 0o2775)
    os.chown(src / "srv", 0, 50)
    (src / "srv/run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "srv/run.sh", 0o4755)
    (src / "fancy\\x2ddir").mkdir()
    (src / "etc").symlink_to("/etc")  # hostile entries must survive the copy as they are
    (src / "home/alice/link").symlink_to("notes.txt")
    os.lchown(src / "home/alice/link", 1000, 1000)
    (src / ".pystate").mkdir(mode=0o700)
    return src


def make_root_tree(base: Path) -> Path:
    root = base / "root"
    for d in ("sbin", "home", "var", "etc", "state"):
        (root / d).mkdir(parents=True)
    (root / "sbin/init").write_text("#!/bin/sh\n")
    os.chmod(root / "sbin/init", 0o755)
    (root / "etc/hostname").write_text("pystate-test\n")
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("trees")
    return make_root_tree(base), make_state_tree(base)


@contextlib.contextmanager
def loop(image: Path, offset: int = 0, size: int = 0, sector_size: int = 512) -> Iterator[str]:
    argv = ["losetup", "--show", "-f", "-r", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    if sector_size != 512:
        argv += ["--sector-size", str(sector_size)]
    device = subprocess.run(
        [*argv, str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


@contextlib.contextmanager
def mounted(device: str, fs: str, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    options = "ro,norecovery" if fs == "xfs" else "ro"
    subprocess.run(["mount", "-t", fs, "-o", options, device, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Type, mode, owner and content (or link target) of every entry below root."""
    skip = {"lost+found"}
    result: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.split("/")[0] in skip:
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            content: object = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        else:
            content = None
        result[rel] = (st.st_mode, st.st_uid, st.st_gid, content)
    top = root.lstat()
    result["."] = (top.st_mode, top.st_uid, top.st_gid, None)
    return result


FSCK = {
    "ext4": ["e2fsck", "-f", "-n"],
    "btrfs": ["btrfs", "check", "--readonly"],
    "xfs": ["xfs_repair", "-n"],
    "erofs": ["fsck.erofs"],
}


def fsck_clean(device: str, fs: str) -> None:
    if fs == "squashfs":
        return  # no checker; unsquashfs in the content check reads every block
    proc = subprocess.run([*FSCK[fs], device], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{fs} on {device} not clean:\n{proc.stdout}\n{proc.stderr}"


def sfdisk_json(image: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True)
    return json.loads(out.stdout)["partitiontable"]  # type: ignore[no-any-return]


def check_partition_table(layout: disk.DiskLayout) -> list[dict]:  # type: ignore[type-arg]
    table = sfdisk_json(layout.path)
    assert table["label"] == "gpt"
    assert table["id"].lower() == layout.disk_uuid
    assert table["sectorsize"] == 512
    parts = table["partitions"]
    assert len(parts) == len(layout.partitions)
    end = 0
    for row, part in zip(parts, layout.partitions, strict=True):
        assert row["type"].lower() == part.type_uuid
        assert row["uuid"].lower() == part.uuid
        assert row["name"] == part.name
        assert row["start"] * 512 == part.start
        assert row["size"] * 512 == part.size
        assert part.start % MiB == 0
        assert part.start >= end
        end = part.start + part.size
        expected_attrs = disk._attrs_text(part.attrs) if part.attrs else None
        assert row.get("attrs") == expected_attrs
    assert layout.path.stat().st_size == layout.size
    # free space after the last partition (the rest of the disk minus the backup GPT)
    assert layout.size - end >= disk.DEFAULT_FREE
    return parts  # type: ignore[no-any-return]


# --- the disk image ------------------------------------------------------------------------


@pytest.mark.parametrize("state_fs", ["ext4", "btrfs", "xfs"])
def test_disk_state_fs(state_fs: str, trees: tuple[Path, Path], tmp_path: Path) -> None:
    root, state = trees
    layout = build_disk(tmp_path / "disk.img", root, state, state_fs=state_fs)
    check_partition_table(layout)
    assert [p.role for p in layout.partitions] == ["root", "state"]
    assert layout.root is not None and layout.root.type_uuid == disk.ROOT_TYPE_X86_64
    assert layout.state is not None and layout.state.name == "state"
    assert layout.state.type_uuid == "24436126-bb50-47e3-b47b-21dbd57591c7"
    assert layout.state.size == disk.DEFAULT_STATE_SIZE
    # sparse: far less allocated than the apparent size
    assert layout.path.stat().st_blocks * 512 < layout.size // 4

    with loop(layout.path, layout.state.start, layout.state.size) as dev:
        fsck_clean(dev, state_fs)
        with mounted(dev, state_fs, tmp_path / "mnt") as mnt:
            assert snapshot(mnt) == snapshot(state)
    with loop(layout.path, layout.root.start, layout.root.size) as dev:
        fsck_clean(dev, "erofs")
        with mounted(dev, "erofs", tmp_path / "mnt") as mnt:
            assert snapshot(mnt) == snapshot(root)


def test_disk_squashfs_root(trees: tuple[Path, Path], tmp_path: Path) -> None:
    root, state = trees
    layout = build_disk(tmp_path / "disk.img", root, state, root_fs="squashfs")
    check_partition_table(layout)
    assert layout.root is not None and layout.root.fs == "squashfs"
    with (
        loop(layout.path, layout.root.start, layout.root.size) as dev,
        mounted(dev, "squashfs", tmp_path / "mnt") as mnt,
    ):
        assert snapshot(mnt) == snapshot(root)


def test_disk_two_state_partitions_and_attrs(trees: tuple[Path, Path], tmp_path: Path) -> None:
    root, state = trees
    empty = tmp_path / "empty"
    empty.mkdir()
    layout = build_disk(
        tmp_path / "disk.img",
        root,
        state,
        extra_states=[empty],
        state_attrs=[60, 63],
        state_size=256 * MiB,
    )
    parts = check_partition_table(layout)
    assert [p.role for p in layout.partitions] == ["root", "state", "state"]
    assert parts[1]["attrs"] == "GUID:60,63"
    assert "attrs" not in parts[2]
    assert len({p.uuid for p in layout.partitions}) == 3
    second = layout.states[1]
    with loop(layout.path, second.start, second.size) as dev:
        fsck_clean(dev, "ext4")
        with mounted(dev, "ext4", tmp_path / "mnt") as mnt:
            assert sorted(p.name for p in mnt.iterdir()) == ["lost+found"]


def test_disk_without_state_partition(trees: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = trees
    layout = build_disk(tmp_path / "disk.img", root, None)
    check_partition_table(layout)
    assert [p.role for p in layout.partitions] == ["root"]
    assert layout.state is None


def test_disk_without_root_partition(trees: tuple[Path, Path], tmp_path: Path) -> None:
    """A second disk of a machine: a state partition and no OS (the SPEC §2 rule 2 test)."""
    _, state = trees
    layout = build_disk(tmp_path / "disk.img", None, state)
    check_partition_table(layout)
    assert [p.role for p in layout.partitions] == ["state"]
    assert layout.root is None and layout.state is not None and layout.state.number == 1


def test_disk_explicit_size(trees: tuple[Path, Path], tmp_path: Path) -> None:
    root, state = trees
    layout = build_disk(tmp_path / "disk.img", root, state, size=1 << 30)
    check_partition_table(layout)
    assert layout.size == 1 << 30
    with pytest.raises(disk.DiskError, match="too small"):
        build_disk(tmp_path / "small.img", root, state, size=100 * MiB)
    assert not (tmp_path / "small.img").exists()


def test_disk_4096_byte_sectors(trees: tuple[Path, Path], tmp_path: Path) -> None:
    root, state = trees
    layout = build_disk(tmp_path / "disk.img", root, state, state_fs="xfs", sector_size=4096)
    assert layout.state is not None
    with loop(layout.path, sector_size=4096) as dev:
        out = subprocess.run(["sfdisk", "--json", dev], check=True, capture_output=True)
        table = json.loads(out.stdout)["partitiontable"]
    assert table["sectorsize"] == 4096
    assert [p["start"] * 4096 for p in table["partitions"]] == [p.start for p in layout.partitions]
    with loop(layout.path, layout.state.start, layout.state.size, sector_size=4096) as dev:
        fsck_clean(dev, "xfs")
        with mounted(dev, "xfs", tmp_path / "mnt") as mnt:
            assert snapshot(mnt) == snapshot(state)


@pytest.mark.parametrize("name", ["with space", "colon:name", "$"])
def test_xfs_protofile_refuses_unrepresentable_names(name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / name).mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(disk.DiskError, match="protofile"):
        disk.write_xfs_protofile(src, work)


def test_cli_disk(trees: tuple[Path, Path], tmp_path: Path) -> None:
    root, state = trees
    repo = Path(__file__).resolve().parent.parent
    argv = [
        os.environ.get("PYTHON", str(repo / ".venv/bin/python")),
        str(repo / "build.py"),
        "disk",
        str(tmp_path / "d.img"),
        "--root",
        str(root),
        "--state",
        str(state),
        "--state-fs",
        "btrfs",
        "--state-attr",
        "read-only",
        "--json",
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    assert [p["fs"] for p in data["partitions"]] == ["erofs", "btrfs"]
    assert data["partitions"][1]["attrs"] == [60]
    table = sfdisk_json(tmp_path / "d.img")
    assert table["partitions"][1]["attrs"] == "GUID:60"
    proc = subprocess.run(
        argv[:4] + ["--root", str(root)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert "--no-state" in proc.stderr
