"""formats/superblock.py and formats/mountinfo.py against the real tools and the real kernel.

Superblocks: file systems made by mkfs.ext4, mkfs.btrfs and mkfs.xfs, read back by pystate
and by blkid/dumpe2fs; arbitrary bytes never make the parsers raise. Mountinfo: a real
tmpfs mounted on a path with every character the kernel escapes, found again in the real
/proc/self/mountinfo; escaping and unescaping round-trip for any path.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root
from hypothesis import given
from hypothesis import strategies as st

from pystate_initrd.formats import mountinfo, superblock
from pystate_initrd.system import block

MIB = 1 << 20


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}


@pytest.fixture(params=sorted(MKFS))
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    fstype: str = request.param
    image = tmp_path / f"{fstype}.img"
    with image.open("wb") as f:
        f.truncate(320 * MIB)  # xfs wants 300 MiB at least
    sh(*MKFS[fstype], str(image))
    yield fstype, image


def test_identify_agrees_with_blkid(made: tuple[str, Path]) -> None:
    fstype, image = made
    info = block.probe(str(image))
    assert info.fstype == fstype
    assert info.uuid == uuid.UUID(sh("blkid", "-o", "value", "-s", "UUID", str(image)).strip())


def test_fs_size_and_ext4_usage_agree_with_the_tools(made: tuple[str, Path]) -> None:
    fstype, image = made
    head = block.read_head(str(image))
    if fstype == "ext4":
        fields = dict(
            line.split(":", 1)
            for line in sh("dumpe2fs", "-h", str(image)).splitlines()
            if ":" in line
        )
        blocks = int(fields["Block count"])
        size = int(fields["Block size"])
        usage = superblock.ext4_usage(head)
        assert usage is not None
        assert (usage.blocks, usage.block_size) == (blocks, size)
        assert usage.free == int(fields["Free blocks"])
        assert superblock.fs_size(head, "ext4") == blocks * size
    elif fstype == "btrfs":
        # A fresh btrfs spans its whole device.
        assert superblock.fs_size(head, "btrfs") == 320 * MIB
        assert superblock.ext4_usage(head) is None
    else:
        assert superblock.fs_size(head, "xfs") is None  # pystate never resizes xfs itself


def test_a_file_system_is_not_taken_for_another(made: tuple[str, Path]) -> None:
    fstype, image = made
    head = block.read_head(str(image))
    for other in ("ext4", "btrfs"):
        if other != fstype:
            assert superblock.fs_size(head, other) is None


@given(st.binary(max_size=superblock.HEAD_BYTES))
def test_superblock_parsers_never_raise(head: bytes) -> None:
    info = superblock.identify(head)
    assert info is None or info.fstype in ("ext4", "btrfs", "xfs")
    for fstype in ("ext4", "btrfs", "xfs"):
        size = superblock.fs_size(head, fstype)
        assert size is None or size >= 0
    usage = superblock.ext4_usage(head)
    assert usage is None or (usage.block_size >= 1024 and usage.size >= 0)


def test_probe_of_nothing_known_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "zeros"
    empty.write_bytes(bytes(superblock.HEAD_BYTES))
    with pytest.raises(block.FsProbeError, match="holds no ext4, btrfs or xfs"):
        block.probe(str(empty))


# --- mountinfo ----------------------------------------------------------------------------


def kernel_escape(path: str) -> str:
    """What the kernel writes for a path in /proc/self/mountinfo (fs/proc_namespace.c)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


_PATH_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")


@given(st.text(_PATH_CHARS, min_size=1).map(lambda t: "/" + t))
def test_unescape_undoes_the_kernels_escape(path: str) -> None:
    assert mountinfo.unescape(kernel_escape(path)) == path


@given(st.text(_PATH_CHARS, min_size=1).map(lambda t: "/" + t.replace("\n", "")))
def test_a_line_round_trips(path: str) -> None:
    line = f"36 35 98:0 / {kernel_escape(path)} rw,noatime master:1 - ext4 /dev/vda2 rw"
    (parsed,) = mountinfo.parse(f"{line}\n")
    assert (parsed.mountpoint, parsed.fstype, parsed.source) == (path, "ext4", "/dev/vda2")
    assert parsed.devnum == (98, 0)


@given(st.text())
def test_parse_never_raises(text: str) -> None:
    for m in mountinfo.parse(text):
        assert m.mountpoint and m.fstype


@needs_root
def test_a_real_mount_with_escaped_characters_is_found(tmp_path: Path) -> None:
    target = tmp_path / "a b\\c\td"
    target.mkdir()
    sh("mount", "-t", "tmpfs", "pystate test", str(target))
    try:
        mounts = mountinfo.parse(Path(mountinfo.MOUNTINFO).read_text())
        found = mountinfo.visible_at(mounts, str(target))
        assert found is not None
        assert (found.fstype, found.source) == ("tmpfs", "pystate test")
    finally:
        subprocess.run(["umount", str(target)], check=True)
