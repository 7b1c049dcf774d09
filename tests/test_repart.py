"""pystate's repart.d definition with the host's real systemd-repart (252) as the oracle.

Factory-fresh disk images (an ESP and a root partition, sparse) get the state partition from
`dracut-module/repart.d/50-pystate-state.conf`, read as in the initrd: below a root directory
(`--root=`, the initrd's `--root=/sysroot`) as `/usr/lib/repart.d/…`, with a distributor's
override in `/etc/repart.d/`. The result is read back with pystate's GPT parser and
superblock reader and with `sfdisk --json`; refusals must leave every byte of the image as it
was; pystate's discovery must find what repart made, or say why there is nothing. systemd-repart
formats through a loop device, so this needs root. About 15 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CAP_SYS_RESOURCE, REPO, has_cap, needs_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystate_build.disk import data_segments
from pystate_initrd.formats import resize_policy, superblock
from pystate_initrd.formats.gpt import (
    GROW_FS,
    STATE_TYPE_GUID,
    GptTable,
    Partition,
    free_extents,
    largest_free_extent,
)
from pystate_initrd.initrd.discover import (
    DiskInfo,
    Initrd,
    Rule,
    StateNotFoundError,
    find_state_partition,
    repart_facts,
)
from pystate_initrd.system import growfs
from pystate_initrd.system.block import read_gpt

pytestmark = [
    pytest.mark.root,
    needs_root,
    pytest.mark.skipif(shutil.which("systemd-repart") is None, reason="needs systemd-repart"),
]

DEFINITION = REPO / "dracut-module/repart.d/50-pystate-state.conf"
NAME = DEFINITION.name
KEYS = ("Type", "Label", "Format", "FactoryReset", "SizeMinBytes", "Flags")
SEED = "0c5a2a2e-5d0e-4a4e-9f5e-2f6a4c3b1d7e"
MiB, GiB = 1 << 20, 1 << 30
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
ROOT_TYPE = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
GRAIN = 4096  # systemd-repart's alignment
BLOCK_GROUP = 128 * MiB  # ext4 with 4 KiB blocks: a last group too small to hold is dropped
CANT_FIT = "Can't fit requested partitions into available free space"
DISK = "/dev/vda"  # the name discovery is given for the image


# ---------------------------------------------------------------- helpers


def sysroot(base: Path, override: str | None = None) -> Path:
    """An OS image's root as systemd-repart --root= sees it: the shipped definition in
    /usr/lib/repart.d, and `override` (a whole file) as /etc/repart.d/ of the same name."""
    root = base / "sysroot"
    (root / "usr/lib/repart.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(DEFINITION, root / "usr/lib/repart.d" / NAME)
    if override is not None:
        (root / "etc/repart.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/repart.d" / NAME).write_text(override)
    return root


def definition_with(**keys: str) -> str:
    """The shipped definition with keys added or changed: what a distributor's copy holds."""
    lines = [
        line
        for line in DEFINITION.read_text().splitlines()
        if line.partition("=")[0] not in keys or line.startswith("#")
    ]
    return "\n".join(lines + [f"{k}={v}" for k, v in keys.items()]) + "\n"


def factory_disk(
    path: Path, size: int, *, root: int = 512 * MiB, state: int = 0, tail: int | None = None
) -> None:
    """A sparse disk as it leaves the factory: a 64 MiB ESP and a root partition from 1 MiB;
    `state` bytes of state partition after them; `tail`: the disk ends that far after the
    last partition (plus the backup GPT) instead of at `size`."""
    rows = [f"start=2048, size={64 * MiB // 512}, type={ESP_TYPE}, name=esp"]
    rows.append(f"size={root // 512}, type={ROOT_TYPE}, name=root-x86-64")
    if state:
        rows.append(f"size={state // 512}, type={STATE_TYPE_GUID}, name=state")
    if tail is not None:
        size = MiB + 64 * MiB + root + state + tail + 33 * 512
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    script = "label: gpt\nunit: sectors\nfirst-lba: 2048\n" + "\n".join(rows) + "\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)


def repart(image: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """systemd-repart as the initrd runs it (there: --root=/sysroot, the seed from its
    machine-id, the root file system's disk), on an image file."""
    argv = [
        "systemd-repart",
        "--dry-run=no",
        f"--root={root}",
        "--empty=refuse",
        f"--seed={SEED}",
        "--pretty=no",
        "--no-pager",
        *extra,
        str(image),
    ]
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "SYSTEMD_LOG_LEVEL": "info"}
    return subprocess.run(argv, capture_output=True, text=True, check=False, env=env)


def plan(image: Path, root: Path) -> list[dict[str, object]]:
    """systemd-repart's dry-run plan, one row per partition."""
    proc = repart(image, root, "--dry-run=yes", "--json=short")
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, object]] = json.loads(proc.stdout)
    return rows


def digest(path: Path) -> str:
    """SHA-256 over the file's size and its data segments with their offsets (holes skipped,
    so a 64 GiB sparse image is hashed in milliseconds; any write shows)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
        for data, hole in data_segments(f.fileno()):
            h.update(data.to_bytes(8, "little"))
            f.seek(data)
            left = hole - data
            while left:
                chunk = f.read(min(left, 8 * MiB))
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def region_digest(path: Path, start: int, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = size
        while left:
            chunk = f.read(min(left, 8 * MiB))
            assert chunk, "short read"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def sfdisk_json(image: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True)
    return json.loads(out.stdout)["partitiontable"]  # type: ignore[no-any-return]


def the_state(table: GptTable) -> Partition:
    [state] = table.state_partitions()
    return state


def head(image: Path, offset: int) -> bytes:
    with image.open("rb") as f:
        f.seek(offset)
        return f.read(superblock.HEAD_BYTES)


@contextlib.contextmanager
def mounted(image: Path, p: Partition, where: Path, *, writable: bool = False) -> Iterator[str]:
    """The partition through an offset loop device, mounted at `where`; yields the device."""
    argv = ["losetup", "--show", "-f", "-o", str(p.start), "--sizelimit", str(p.size)]
    device = subprocess.run(
        [*argv, *([] if writable else ["-r"]), str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    where.mkdir(exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "ext4", "-o", "rw" if writable else "ro", device, str(where)],
            check=True,
        )
        try:
            yield device
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


def check_created(image: Path, before: GptTable) -> tuple[GptTable, Partition]:
    """The one new partition is pystate's, agrees with sfdisk, and its ext4 covers it."""
    table = read_gpt(image)
    state = the_state(table)
    assert [p for p in table.partitions if p != state] == list(before.partitions)
    assert state.index == len(before.partitions) + 1
    assert state.name == "state"
    assert state.attributes == GROW_FS  # Flags=: bit 59 alone
    assert state.start % GRAIN == 0 and state.size % GRAIN == 0
    assert state.size >= GiB  # SizeMinBytes=
    row = sfdisk_json(image)["partitions"][state.index - 1]
    assert row["type"].lower() == str(STATE_TYPE_GUID)
    assert (row["start"] * 512, row["size"] * 512) == (state.start, state.size)
    assert (row["name"], row.get("attrs")) == ("state", "GUID:59")
    data = head(image, state.start)
    info = superblock.identify(data)
    assert info is not None and info.fstype == "ext4"
    usage = superblock.ext4_usage(data)
    assert usage is not None
    assert state.size - BLOCK_GROUP < usage.size <= state.size
    label = subprocess.run(
        ["dumpe2fs", "-h", f"{image}?offset={state.start}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^Filesystem volume name:\s+state$", label, re.MULTILINE)
    assert re.search(r"^Reserved block count:\s+0$", label, re.MULTILINE)  # pystate's own reserve
    return table, state


# ---------------------------------------------------------------- the definition itself


def test_definition_uses_only_keys_repart_knows(tmp_path: Path) -> None:
    """Every key is one systemd 252 parses (it warns and ignores unknown ones), and the plan
    for a fresh disk creates exactly our partition."""
    keys = [
        line.partition("=")[0]
        for line in DEFINITION.read_text().splitlines()
        if line and not line.startswith(("#", "["))
    ]
    assert sorted(keys) == sorted(KEYS)
    image = tmp_path / "disk.img"
    factory_disk(image, 8 * GiB)
    root = sysroot(tmp_path)
    proc = repart(image, root, "--dry-run=yes", "--json=short")
    assert proc.returncode == 0, proc.stderr
    for complaint in ("Unknown key", "Unknown section", "Failed to parse", "Invalid", "ignoring"):
        assert complaint not in proc.stderr, proc.stderr
    rows = json.loads(proc.stdout)
    created = [r for r in rows if r["activity"] == "create"]
    assert [(r["type"], r["label"], r["file"]) for r in created] == [
        (str(STATE_TYPE_GUID), "state", NAME)
    ]


def test_the_keys_a_distributor_sets_are_known(tmp_path: Path) -> None:
    """The keys the file's comments and docs/repart.md offer (and a bogus one, to show the
    check can fail)."""
    image = tmp_path / "disk.img"
    factory_disk(image, 8 * GiB)
    override = definition_with(SizeMaxBytes="4G", PaddingMinBytes="1G", Weight="500")
    proc = repart(image, sysroot(tmp_path, override), "--dry-run=yes")
    assert proc.returncode == 0 and "Unknown key" not in proc.stderr, proc.stderr
    proc = repart(image, sysroot(tmp_path, definition_with(SizeMaximum="4G")), "--dry-run=yes")
    assert "Unknown key 'SizeMaximum'" in proc.stderr


def test_drop_in_directory_in_the_os_image_is_ignored(tmp_path: Path) -> None:
    """systemd 252 reads 50-pystate-state.conf.d/ from the host's search path even under
    --root=: a drop-in in the OS image does nothing in the initrd (docs/repart.md says to
    copy the whole file instead). A newer systemd may change this: then update the docs."""
    image = tmp_path / "disk.img"
    factory_disk(image, 8 * GiB)
    root = sysroot(tmp_path)
    for where in ("etc/repart.d", "usr/lib/repart.d"):
        dropin = root / where / f"{NAME}.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "10-max.conf").write_text("[Partition]\nSizeMaxBytes=2G\n")
    [row] = [r for r in plan(image, root) if r["activity"] == "create"]
    assert isinstance(row["raw_size"], int) and row["raw_size"] > 7 * GiB


def test_masked_by_a_symlink_to_dev_null(tmp_path: Path) -> None:
    """How a machine that has the package but must not get a state partition (a build host)
    turns the definition off: /etc/repart.d/50-pystate-state.conf -> /dev/null."""
    image = tmp_path / "disk.img"
    factory_disk(image, 8 * GiB)
    root = sysroot(tmp_path)
    (root / "etc/repart.d").mkdir(parents=True)
    (root / "etc/repart.d" / NAME).symlink_to("/dev/null")
    was = digest(image)
    proc = repart(image, root)
    assert proc.returncode == 0 and "Didn't find any partition definition files" in proc.stderr
    assert digest(image) == was
    assert repart_facts(root, Initrd.SYSTEMD).masked


# ---------------------------------------------------------------- a fresh disk


def test_large_disk_filled_then_kept(tmp_path: Path) -> None:
    """64 GiB, sparse: the state partition takes all the free space, formatted; a second run
    changes nothing; discovery and `pystate gpt` find it."""
    image = tmp_path / "disk.img"
    factory_disk(image, 64 * GiB)
    root = sysroot(tmp_path)
    before = read_gpt(image)
    free = largest_free_extent(before)
    assert free is not None
    started = time.monotonic()
    proc = repart(image, root)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert took < 30, f"systemd-repart took {took:.1f} s on a 64 GiB sparse image"
    table, state = check_created(image, before)
    assert state.start == free.start  # right after the root partition
    assert free.start + free.size - (state.start + state.size) < GRAIN  # the rest, all of it
    left = largest_free_extent(table)
    assert left is None or left.size < GRAIN
    assert superblock.ext4_usage(head(image, state.start)).size == state.size  # type: ignore[union-attr]
    assert image.stat().st_blocks * 512 < GiB  # still sparse: lazy init, no zeroing

    again = digest(image)
    proc = repart(image, root)
    assert proc.returncode == 0, proc.stderr
    assert digest(image) == again  # idempotent: the second boot's run is a no-op

    choice = find_state_partition(
        [DiskInfo(DISK, table)], cmdline_state=None, loader_partuuid=None, root_disk=DISK
    )
    assert (choice.partition, choice.rule, choice.grow_fs) == (state, Rule.ROOT_DISK, True)
    out = subprocess.run(
        [sys.executable, "-m", "pystate_initrd", "gpt", str(image), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    rows = [p for p in json.loads(out)["partitions"] if p["state"]]
    assert [(r["index"], r["name"], r["size"]) for r in rows] == [(3, "state", state.size)]


def test_minimum_is_enough_for_pystate(tmp_path: Path) -> None:
    """With exactly SizeMinBytes free, the partition repart makes holds pystate's reserve and
    its smallest image with room to spare (what the first boot's 'allocate' step computes)."""
    image = tmp_path / "disk.img"
    factory_disk(image, 0, tail=GiB)
    before = read_gpt(image)
    proc = repart(image, sysroot(tmp_path))
    assert proc.returncode == 0, proc.stderr
    _, state = check_created(image, before)
    assert state.size < GiB + MiB
    with mounted(image, state, tmp_path / "mnt"):
        st_ = os.statvfs(tmp_path / "mnt")
    outer, free = st_.f_blocks * st_.f_frsize, st_.f_bavail * st_.f_frsize
    params = resize_policy.DEFAULT_PARAMS
    size = resize_policy.initial_size(outer, free, 16 * MiB, params)
    assert size >= params.min_image_size
    left = free - resize_policy.reserve(outer, params) - size
    assert left > 256 * MiB, (outer, free, size, left)


# ---------------------------------------------------------------- limits from the distributor


@dataclass(frozen=True)
class Limits:
    disk: int  # bytes of free space after the root partition
    size_max: int | None
    padding_min: int | None


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    limits=st.builds(
        Limits,
        disk=st.integers(1, 24).map(lambda g: g * GiB // 2 + 3 * MiB),
        size_max=st.none() | st.integers(2, 16).map(lambda g: g * GiB // 2),
        padding_min=st.none() | st.integers(1, 16).map(lambda g: g * GiB // 2),
    )
)
def test_distributor_limits_are_honoured(tmp_path: Path, limits: Limits) -> None:
    """An /etc/repart.d copy with SizeMaxBytes= / PaddingMinBytes=: the partition is at least
    1 GiB and at most the maximum, the padding after it is left free; when that cannot be,
    nothing is written."""
    image = tmp_path / "disk.img"
    factory_disk(image, 0, tail=limits.disk)
    keys = {}
    if limits.size_max is not None:
        keys["SizeMaxBytes"] = str(limits.size_max)
    if limits.padding_min is not None:
        keys["PaddingMinBytes"] = str(limits.padding_min)
    root = sysroot(tmp_path / "r", definition_with(**keys))
    before = read_gpt(image)
    free = largest_free_extent(before)
    assert free is not None
    needed = GiB + (limits.padding_min or 0)
    was = digest(image)
    proc = repart(image, root)
    if proc.returncode != 0:
        assert CANT_FIT in proc.stderr, proc.stderr
        assert digest(image) == was
        assert free.size < needed + GRAIN
        return
    assert free.size >= needed
    table, state = check_created(image, before)
    if limits.size_max is not None:
        assert state.size <= limits.size_max
    end = free.start + free.size
    after = end - (state.start + state.size)
    assert after >= (limits.padding_min or 0)
    if limits.size_max is None and limits.padding_min is None:
        assert after < GRAIN
    # What is left over stays free for the distributor (a second OS slot): in one run when
    # only one of the limits is set.
    runs = [e.size for e in free_extents(table) if e.size >= GRAIN]
    assert sum(runs) >= free.size - state.size - 2 * GRAIN
    if (limits.size_max is None) != (limits.padding_min is None):
        assert len(runs) <= 1


def test_size_max_leaves_the_room_before_the_partition(tmp_path: Path) -> None:
    """systemd-repart 252 puts a partition capped by SizeMaxBytes= at the end of the free
    space: the room it leaves lies between the root partition and the state partition.
    PaddingMinBytes= leaves it after the state partition. (docs/repart.md)"""
    image = tmp_path / "disk.img"
    for keys, room_before in (({"SizeMaxBytes": "3G"}, True), ({"PaddingMinBytes": "3G"}, False)):
        factory_disk(image, 8 * GiB)
        free = largest_free_extent(read_gpt(image))
        assert free is not None
        root = sysroot(tmp_path / next(iter(keys)), definition_with(**keys))
        assert repart(image, root).returncode == 0
        state = the_state(read_gpt(image))
        before = state.start - free.start
        after = free.start + free.size - (state.start + state.size)
        assert (before >= 3 * GiB, after >= 3 * GiB) == (room_before, not room_before)


def test_a_b_recipe_from_the_docs(tmp_path: Path) -> None:
    """docs/repart.md's second OS slot made by repart at first boot: root A pinned with
    Weight=0 (a root definition without it would take half the free space), root B of a
    fixed size, created empty right after A; the state partition takes the rest."""
    image = tmp_path / "disk.img"
    factory_disk(image, 8 * GiB)
    root = sysroot(tmp_path)
    (root / "usr/lib/repart.d/10-root-a.conf").write_text("[Partition]\nType=root\nWeight=0\n")
    (root / "usr/lib/repart.d/20-root-b.conf").write_text(
        "[Partition]\nType=root\nLabel=_empty\nSizeMinBytes=512M\nSizeMaxBytes=512M\n"
    )
    rows = {str(r["file"]): r for r in plan(image, root)}
    free = largest_free_extent(read_gpt(image))
    assert free is not None
    assert (rows["10-root-a.conf"]["activity"], rows["10-root-a.conf"]["raw_size"]) == (
        "unchanged",
        512 * MiB,
    )
    b, state = rows["20-root-b.conf"], rows[NAME]
    assert (b["activity"], b["label"], b["offset"], b["raw_size"]) == (
        "create",
        "_empty",
        free.start,
        512 * MiB,
    )
    assert (state["activity"], state["offset"]) == ("create", free.start + 512 * MiB)
    assert free.size - 512 * MiB - GRAIN < int(str(state["raw_size"])) <= free.size - 512 * MiB


# ---------------------------------------------------------------- not enough room: untouched


@pytest.mark.parametrize(
    ("case", "tail"),
    [
        ("half-a-gigabyte", 523 * MiB),
        ("just-below-the-minimum", GiB - GRAIN),
        ("full", 0),
    ],
)
def test_too_little_room_changes_nothing(tmp_path: Path, case: str, tail: int) -> None:
    """Less free space than SizeMinBytes: systemd-repart refuses and the image is bit for bit
    what it was; the free space it reports is the one pystate's message names."""
    image = tmp_path / "disk.img"
    factory_disk(image, 0, tail=tail)
    root = sysroot(tmp_path)
    table = read_gpt(image)
    was = digest(image)
    proc = repart(image, root)
    assert proc.returncode != 0
    assert CANT_FIT in proc.stderr, proc.stderr
    assert digest(image) == was
    m = re.search(r"available free space \(([\d.]+)([KMG]?)B?\)", proc.stderr)
    assert m is not None, proc.stderr
    reported = float(m.group(1)) * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}[m.group(2)]
    extent = largest_free_extent(table)
    ours = extent.size if extent else 0
    # repart rounds each run to 4 KiB and prints one decimal, truncated; libfdisk also
    # counts LBA 34-2047 below the header's first usable LBA (2048) as free: 1004 KiB
    assert ours - GRAIN - 0.1 * MiB <= reported <= max(ours, 1004 << 10) + 0.1 * MiB, (
        reported,
        ours,
    )

    with pytest.raises(StateNotFoundError) as exc:
        find_state_partition(
            [DiskInfo(DISK, table)],
            cmdline_state=None,
            loader_partuuid=None,
            root_disk=DISK,
            repart=repart_facts(root, Initrd.SYSTEMD),
        )
    text = str(exc.value)
    if tail:
        assert f"its largest unpartitioned extent is {resize_policy.human_size(ours)}" in text
    else:
        assert "; it has no unpartitioned space" in text
    assert (
        f"systemd-repart makes it from {root}/usr/lib/repart.d/{NAME} only with "
        "SizeMinBytes=1 GiB free in one piece, so it touched nothing"
    ) in text


# ---------------------------------------------------------------- a disk that has a state partition


def test_existing_state_partition_and_its_data_kept(tmp_path: Path) -> None:
    """A state partition made at the factory (build.py disk, with data) and free space after
    it: repart keeps its start and every byte of it, only grows the entry into the free space
    after it (no SizeMaxBytes=); the file system is untouched (pystate grows it at boot when
    bit 59 is set); the next run is a no-op."""
    from pystate_build.disk import build_disk

    rootfs, statefs = tmp_path / "root", tmp_path / "state"
    (rootfs / "state").mkdir(parents=True)
    (statefs / "home").mkdir(parents=True)
    (statefs / "home/note").write_text("made at the factory\n")
    layout = build_disk(tmp_path / "disk.img", rootfs, statefs, state_size=GiB, free=256 * MiB)
    image = layout.path
    old = the_state(read_gpt(image))
    kept = region_digest(image, old.start, old.size)
    proc = repart(image, sysroot(tmp_path))
    assert proc.returncode == 0, proc.stderr
    new = the_state(read_gpt(image))
    assert (new.index, new.start, new.part_guid, new.name) == (
        old.index,
        old.start,
        old.part_guid,
        old.name,
    )
    assert new.size > old.size + 200 * MiB  # grown into the free space after it
    assert region_digest(image, old.start, old.size) == kept
    assert superblock.ext4_usage(head(image, new.start)).size == old.size  # type: ignore[union-attr]
    was = digest(image)
    assert repart(image, sysroot(tmp_path)).returncode == 0
    assert digest(image) == was
    with mounted(image, new, tmp_path / "mnt"):
        assert (tmp_path / "mnt/home/note").read_text() == "made at the factory\n"


def test_existing_state_partition_below_the_minimum_fails_untouched(tmp_path: Path) -> None:
    """SizeMinBytes= binds an existing partition too: one smaller than 1 GiB with no room to
    grow makes every run fail, and nothing is written (docs/repart.md: lower the minimum in
    an override for such disks)."""
    image = tmp_path / "disk.img"
    factory_disk(image, 0, state=384 * MiB, tail=64 * MiB)
    was = digest(image)
    proc = repart(image, sysroot(tmp_path))
    assert proc.returncode != 0 and CANT_FIT in proc.stderr, proc.stderr
    assert digest(image) == was
    override = definition_with(SizeMinBytes="256M")
    assert repart(image, sysroot(tmp_path / "o", override)).returncode == 0


def test_disk_made_larger_grows_partition_then_pystate_grows_ext4(tmp_path: Path) -> None:
    """A disk made larger (a VM's, or an image written to a bigger device): the next run
    grows the state partition; bit 59 makes pystate grow the ext4 (growfs at boot). ext4's
    online grow needs CAP_SYS_RESOURCE, which this host may lack (tests/test_resize_host.py):
    then resize2fs grows it offline, to show the partition's new room is usable."""
    image = tmp_path / "disk.img"
    factory_disk(image, 4 * GiB)
    root = sysroot(tmp_path)
    assert repart(image, root).returncode == 0
    small = the_state(read_gpt(image))
    with image.open("r+b") as f:
        f.truncate(6 * GiB)
    proc = repart(image, root)
    assert proc.returncode == 0, proc.stderr
    big = the_state(read_gpt(image))
    assert (big.start, big.part_guid) == (small.start, small.part_guid)
    assert big.size > small.size + GiB and big.grow_fs
    if has_cap(CAP_SYS_RESOURCE):
        with mounted(image, big, tmp_path / "mnt", writable=True) as device:
            growfs.grow(device, "ext4", tmp_path / "mnt")
    else:
        target = f"{image}?offset={big.start}"
        subprocess.run(["e2fsck", "-fp", target], check=True, capture_output=True)
        subprocess.run(
            ["resize2fs", target, f"{big.size // 4096}"], check=True, capture_output=True
        )
    usage = superblock.ext4_usage(head(image, big.start))
    assert usage is not None and big.size - BLOCK_GROUP < usage.size <= big.size
