"""Which partition is the state partition (SPEC §2).

`find_state_partition` is the pure rule engine over already-read disks. The
rest of the file is the thin I/O that feeds it in the initrd, without udev or
blkid: whole disks from /sys/class/block, partition nodes from sysfs, the boot
loader's EFI variable, the disk below the root file system, and file-system
UUIDs read from superblocks.

The rules, in order; the first that applies decides, and a rule that names a
disk binds: the state partition must then be on that disk, it is never looked
for elsewhere (booting a live medium must not adopt an installed system's state).
1. `pystate.state=` — `PARTUUID=…`, `UUID=…` (file system) or a device path.
   An explicitly named partition of any type is accepted; its attribute bits are
   reported (including no-auto, for the caller to honour).
2. The disk holding the partition whose PARTUUID is `LoaderDevicePartUUID`.
3. The disk holding the root file system.
4. The one state partition over all disks.
Partitions with the no-auto bit are skipped by rules 2 to 4. Two candidates on the
chosen disk, or candidates on several disks and no rule to choose: refused.

When the disk rule 2 or 3 chose has no state partition, the error says how much
unpartitioned space it has and why systemd-repart did not make one there: the kind of
initrd (a shell initrd has no systemd-repart) and the definition it would have read
from the OS image, as `RepartFacts` (read by `repart_facts`, docs/repart.md).
"""

from __future__ import annotations

import enum
import os
import stat
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import efivar, mountinfo
from pystate_initrd.formats.gpt import (
    STATE_TYPE_GUID,
    GptError,
    GptTable,
    Partition,
    largest_free_extent,
)
from pystate_initrd.formats.repart import DEFINITION, SEARCH_DIRS, size_min
from pystate_initrd.formats.resize_policy import human_size
from pystate_initrd.system import block
from pystate_initrd.system import efivars as efivars_io

LOADER_PARTUUID_VARIABLE = efivar.LOADER_DEVICE_PART_UUID
_VIRTUAL_PREFIXES = ("loop", "ram", "zram")
SYSTEMD_RUNTIME_DIR = "/run/systemd/system"  # exists iff systemd is PID 1 (sd_booted(3))
_DEFINITION_MAX = 64 * 1024


class DiscoverError(PystateError):
    """No state partition can be chosen without guessing."""


class StateNotFoundError(DiscoverError):
    """The partition or disk a rule names is absent (it may not have appeared yet)."""


class Rule(enum.StrEnum):
    CMDLINE = "pystate.state= on the kernel command line"
    LOADER = "disk of the boot loader's partition (LoaderDevicePartUUID)"
    ROOT_DISK = "disk of the root file system"
    ONLY_ONE = "only state partition on any disk"


class Initrd(enum.StrEnum):
    SYSTEMD = "systemd"  # systemd-repart may have run before pystate
    SHELL = "shell"  # dracut without systemd: no systemd-repart


@dataclass(frozen=True)
class RepartFacts:
    """Why systemd-repart made no state partition, as far as the initrd can tell."""

    initrd: Initrd
    sysroot: str = "/sysroot"
    definition: str | None = None  # the file systemd-repart reads (under sysroot); None: none
    masked: bool = False  # a symlink to /dev/null or an empty file of that name
    size_min: int | None = None  # its SizeMinBytes= (None: not a size we could read)


@dataclass(frozen=True)
class DiskInfo:
    device: str  # e.g. /dev/vda
    table: GptTable
    # Partition index → device node, from sysfs; missing ones follow the kernel's naming.
    nodes: Mapping[int, str] = field(default_factory=dict)

    def node(self, index: int) -> str:
        return self.nodes.get(index) or partition_node(self.device, index)


@dataclass(frozen=True)
class StateChoice:
    device: str
    rule: Rule
    reason: str
    disk: str | None = None
    partition: Partition | None = None  # None: a device path outside any GPT we read
    warnings: tuple[str, ...] = ()

    @property
    def part_uuid(self) -> uuid.UUID | None:
        return self.partition.part_guid if self.partition else None

    @property
    def no_auto(self) -> bool:
        return bool(self.partition and self.partition.no_auto)

    @property
    def read_only(self) -> bool:
        return bool(self.partition and self.partition.read_only)

    @property
    def grow_fs(self) -> bool:
        return bool(self.partition and self.partition.grow_fs)

    def to_json(self) -> dict[str, object]:
        p = self.partition
        return {
            "device": self.device,
            "disk": self.disk,
            "rule": self.rule.name.lower(),
            "reason": self.reason,
            "part_uuid": str(p.part_guid) if p else None,
            "type_uuid": str(p.type_guid) if p else None,
            "index": p.index if p else None,
            "name": p.name if p else None,
            "start": p.start if p else None,
            "size": p.size if p else None,
            "attributes": p.attributes if p else None,
            "read_only": self.read_only,
            "grow_fs": self.grow_fs,
            "no_auto": self.no_auto,
            "warnings": list(self.warnings),
        }


def partition_node(disk: str, index: int) -> str:
    """The kernel's name for partition `index` of `disk`: vda2, nvme0n1p2, loop0p1."""
    return f"{disk}{'p' if disk[-1:].isdigit() else ''}{index}"


def _describe(disk: DiskInfo, p: Partition) -> str:
    return f"{disk.node(p.index)} (PARTUUID {p.part_guid})"


def _candidates(disk: DiskInfo) -> list[Partition]:
    return [p for p in disk.table.partitions if p.is_state and not p.no_auto]


def _warnings(disk: DiskInfo | None) -> tuple[str, ...]:
    if disk is None or disk.table.warning is None:
        return ()
    return (f"{disk.device}: {disk.table.warning}",)


def _disk_list(disks: Sequence[DiskInfo], skipped: Sequence[str]) -> str:
    text = ", ".join(d.device for d in disks) if disks else "no disk with a GPT"
    return text + (f" (skipped: {'; '.join(skipped)})" if skipped else "")


def free_space_text(table: GptTable) -> str:
    """How much room a new partition has: the largest unpartitioned extent, not the sum."""
    extent = largest_free_extent(table)
    if extent is None:
        return "it has no unpartitioned space"
    return f"its largest unpartitioned extent is {human_size(extent.size)}"


def repart_hint(facts: RepartFacts, disk: str, free: int, root_disk: str | None) -> str:
    """What to do about a disk without a state partition, given what systemd-repart saw.

    `free`: the disk's largest unpartitioned extent in bytes; `root_disk`: the disk of the
    root file system, the only one systemd-repart adds partitions to.
    """
    if facts.initrd is Initrd.SHELL:
        return (
            "this initrd has no systemd-repart to make one: create the state partition "
            "when the disk is made, see docs/repart.md"
        )
    shipped = f"/usr/lib/repart.d/{DEFINITION}"
    if root_disk is not None and root_disk != disk:
        return (
            f"systemd-repart adds partitions only to the root file system's disk {root_disk}: "
            f"create the state partition on {disk} when the disk is made, or name one with "
            "pystate.state=PARTUUID=…"
        )
    if facts.definition is None:
        return (
            f"systemd-repart makes it only from {shipped} in the OS image, and "
            f"{facts.sysroot} has none: install pystate in the OS image, or create the "
            "partition when the disk is made"
        )
    if facts.masked:
        return (
            f"systemd-repart would make it from {shipped}, but {facts.definition} masks "
            "it: remove that file, or create the partition when the disk is made"
        )
    if facts.size_min is not None and free < facts.size_min:
        return (
            f"systemd-repart makes it from {facts.definition} only with "
            f"SizeMinBytes={human_size(facts.size_min)} free in one piece, so it touched "
            "nothing: free or add disk space, or lower SizeMinBytes=, see docs/repart.md"
        )
    return (
        f"systemd-repart should have made it from {facts.definition}: see "
        "journalctl -b -u systemd-repart; it must run after sysroot.mount and before "
        "pystate.service, see docs/repart.md"
    )


def _on_disk(
    disk: DiskInfo,
    rule: Rule,
    why: str,
    facts: RepartFacts | None = None,
    root_disk: str | None = None,
) -> StateChoice:
    """The one auto-discoverable state partition on the disk a rule chose."""
    found = _candidates(disk)
    if len(found) == 1:
        p = found[0]
        return StateChoice(disk.node(p.index), rule, why, disk.device, p, warnings=_warnings(disk))
    if not found:
        ignored = [_describe(disk, p) for p in disk.table.partitions if p.is_state and p.no_auto]
        extra = f"; ignored with the no-auto bit (63): {', '.join(ignored)}" if ignored else ""
        extent = largest_free_extent(disk.table)
        hint = None
        if facts is not None:
            hint = repart_hint(facts, disk.device, extent.size if extent else 0, root_disk)
        raise StateNotFoundError(
            f"no partition of type {STATE_TYPE_GUID} on {disk.device}, {why}{extra}; "
            f"{free_space_text(disk.table)}",
            hint=hint,
        )
    raise DiscoverError(
        f"{len(found)} state partitions on {disk.device} ({why}): "
        f"{', '.join(_describe(disk, p) for p in found)}; refusing to guess",
        hint="name one with pystate.state=PARTUUID=… or set the no-auto bit (63) on the others",
    )


def _parse_uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise DiscoverError(f"pystate.state={what}{text}: not a UUID") from None


def _by_cmdline(
    spec: str,
    disks: Sequence[DiskInfo],
    fs_uuid: Callable[[str], uuid.UUID | None] | None,
    skipped: Sequence[str],
) -> StateChoice:
    def pick(matches: list[tuple[DiskInfo, Partition]], what: str) -> StateChoice:
        if not matches:
            raise StateNotFoundError(
                f"pystate.state={spec}: no partition with that {what} on "
                f"{_disk_list(disks, skipped)}"
            )
        if len(matches) > 1:
            raise DiscoverError(
                f"pystate.state={spec}: several partitions have that {what}: "
                f"{', '.join(_describe(d, p) for d, p in matches)}; refusing to guess",
                hint="cloned disks? change the duplicate's UUID or detach it",
            )
        disk, p = matches[0]
        return StateChoice(
            disk.node(p.index),
            Rule.CMDLINE,
            f"named by pystate.state={spec}",
            disk.device,
            p,
            warnings=_warnings(disk),
        )

    parts = [(d, p) for d in disks for p in d.table.partitions]
    if spec.startswith("PARTUUID="):
        wanted = _parse_uuid(spec[len("PARTUUID=") :], "PARTUUID=")
        return pick([(d, p) for d, p in parts if p.part_guid == wanted], "PARTUUID")
    if spec.startswith("UUID="):
        wanted = _parse_uuid(spec[len("UUID=") :], "UUID=")
        if fs_uuid is None:
            raise DiscoverError(f"pystate.state={spec}: no way to read file system UUIDs given")
        return pick([(d, p) for d, p in parts if fs_uuid(d.node(p.index)) == wanted], "UUID")
    if spec.startswith("/"):
        matches = [(d, p) for d, p in parts if d.node(p.index) == spec]
        if matches:
            return pick(matches, "device path")
        # Not a partition of a GPT disk we read (md, a whole disk…): named explicitly, so used.
        return StateChoice(spec, Rule.CMDLINE, f"named by pystate.state={spec} (not in a GPT)")
    raise DiscoverError(f"pystate.state={spec}: expected PARTUUID=…, UUID=… or a /dev/ path")


def find_state_partition(
    disks: Sequence[DiskInfo],
    *,
    cmdline_state: str | None,
    loader_partuuid: uuid.UUID | None,
    root_disk: str | None,
    fs_uuid: Callable[[str], uuid.UUID | None] | None = None,
    skipped: Sequence[str] = (),
    repart: RepartFacts | None = None,
) -> StateChoice:
    """Apply the rules of SPEC §2 to `disks`; raise DiscoverError rather than guess.

    `fs_uuid(node)` reads a partition's file-system UUID (for `UUID=`);
    `skipped` describes disks left out (no GPT…), for the error messages; `repart`, when
    given, lets a chosen disk without a state partition say what to do about it.
    """
    if cmdline_state:
        return _by_cmdline(cmdline_state, disks, fs_uuid, skipped)

    if loader_partuuid is not None:
        holders = [
            d for d in disks if any(p.part_guid == loader_partuuid for p in d.table.partitions)
        ]
        if not holders:
            raise StateNotFoundError(
                f"the boot loader's partition (LoaderDevicePartUUID {loader_partuuid}) is on "
                f"none of the disks: {_disk_list(disks, skipped)}"
            )
        if len(holders) > 1:
            raise DiscoverError(
                f"the boot loader's partition (PARTUUID {loader_partuuid}) is on several disks: "
                f"{', '.join(d.device for d in holders)}; refusing to guess",
                hint="cloned disks? name the state partition with pystate.state=PARTUUID=…",
            )
        return _on_disk(
            holders[0], Rule.LOADER, "the disk of the boot loader's partition", repart, root_disk
        )

    if root_disk is not None:
        for disk in disks:
            if disk.device == root_disk:
                return _on_disk(
                    disk, Rule.ROOT_DISK, "the disk of the root file system", repart, root_disk
                )
        hint = None
        if repart is not None and repart.initrd is Initrd.SHELL:
            hint = repart_hint(repart, root_disk, 0, root_disk)
        elif repart is not None:
            hint = (
                "systemd-repart adds partitions only to a disk that has a GPT already "
                "(--empty=refuse): create the GPT and the state partition when the disk is made"
            )
        raise StateNotFoundError(
            f"the root file system's disk {root_disk} has no GPT with a state partition; "
            f"disks: {_disk_list(disks, skipped)}",
            hint=hint,
        )

    found = [(d, p) for d in disks for p in _candidates(d)]
    if len(found) == 1:
        disk, p = found[0]
        return StateChoice(
            disk.node(p.index),
            Rule.ONLY_ONE,
            "the only state partition on any disk",
            disk.device,
            p,
            warnings=_warnings(disk),
        )
    if not found:
        raise StateNotFoundError(
            f"no partition of type {STATE_TYPE_GUID} found on {_disk_list(disks, skipped)}"
        )
    raise DiscoverError(
        f"{len(found)} state partitions and no rule to choose between them: "
        f"{', '.join(_describe(d, p) for d, p in found)}; refusing to guess",
        hint="name one with pystate.state=PARTUUID=…",
    )


# ---------------------------------------------------------------- I/O: sysfs, efivars, superblocks


def list_disks(sys_dir: str | Path = "/sys", *, include_virtual: bool = False) -> list[str]:
    """Kernel names of whole disks with a non-zero size (no `partition` file), sorted."""
    block = Path(sys_dir) / "class" / "block"
    names = []
    for entry in sorted(os.listdir(block)):
        if not include_virtual and entry.startswith(_VIRTUAL_PREFIXES):
            continue
        if (block / entry / "partition").exists():
            continue
        try:
            if int((block / entry / "size").read_text()) == 0:  # empty loop, no medium
                continue
        except (OSError, ValueError):
            continue
        names.append(entry)
    return names


def partition_nodes(disk: str, sys_dir: str | Path = "/sys") -> dict[int, str]:
    """Partition number → /dev node, from /sys/class/block/<disk>/<part>/partition."""
    nodes: dict[int, str] = {}
    base = Path(sys_dir) / "class" / "block" / disk
    try:
        entries = os.listdir(base)
    except OSError:  # the disk went away (a detached loop device)
        return nodes
    for entry in entries:
        try:
            number = int((base / entry / "partition").read_text())
        except (OSError, ValueError):
            continue
        nodes[number] = f"/dev/{entry}"
    return nodes


def parse_loader_variable(raw: bytes) -> uuid.UUID:
    """The PARTUUID in an efivarfs file: 4 bytes of attributes, then a UTF-16LE string."""
    try:
        text = raw[4:].decode("utf-16-le").split("\0", 1)[0].strip()
        return uuid.UUID(text)
    except (UnicodeDecodeError, ValueError):
        raise DiscoverError(
            f"EFI variable {LOADER_PARTUUID_VARIABLE} does not hold a UUID: {raw[4:80]!r}"
        ) from None


def read_loader_partuuid(
    efivars: str | Path = "/sys/firmware/efi/efivars",
) -> uuid.UUID | None:
    """The boot loader's partition, or None when not booted by a loader that sets it."""
    try:
        raw = efivars_io.read_raw(Path(efivars), LOADER_PARTUUID_VARIABLE)
    except efivars_io.EfiVarsError as exc:
        raise DiscoverError(str(exc)) from None
    return None if raw is None else parse_loader_variable(raw)


def disk_of_devnum(major: int, minor: int, sys_dir: str | Path = "/sys") -> str | None:
    """/dev path of the whole disk below a block device (through dm/md slaves), or None.

    None also when the device stacks on several disks: no single disk to choose.
    """
    sys_path = Path(sys_dir)
    disks: set[str] = set()

    def walk(node: Path, depth: int) -> None:
        real = node.resolve()
        if depth > 16 or not real.exists():
            return
        if (real / "partition").exists():
            disks.add(real.parent.name)
            return
        slaves = sorted((real / "slaves").iterdir()) if (real / "slaves").is_dir() else []
        if not slaves:
            disks.add(real.name)
        for slave in slaves:
            walk(sys_path / "class" / "block" / slave.name, depth + 1)

    walk(sys_path / "dev" / "block" / f"{major}:{minor}", 0)
    return f"/dev/{disks.pop()}" if len(disks) == 1 else None


def root_disk_of(
    mountpoint: str | Path = "/sysroot",
    *,
    mountinfo_path: str | Path = mountinfo.MOUNTINFO,
    sys_dir: str | Path = "/sys",
) -> str | None:
    """The disk under the file system mounted at `mountpoint`, or None (not mounted, tmpfs…)."""
    target = os.path.normpath(str(mountpoint))
    found = mountinfo.visible_at(mountinfo.parse(Path(mountinfo_path).read_text()), target)
    if found is None:
        return None
    (major, minor), source = found.devnum, found.source
    if major == 0 and source.startswith("/dev/"):
        # btrfs and others report an anonymous device number; its source names the device.
        try:
            st = os.stat(source)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if major == 0:
        return None
    return disk_of_devnum(major, minor, sys_dir)


# (offset of the magic, magic, offset of the 16-byte UUID) per file system
def read_fs_uuid(device: str | Path) -> uuid.UUID | None:
    """File-system UUID of a device or image; None when unreadable or unrecognized."""
    try:
        return block.probe(str(device)).uuid
    except block.FsProbeError:
        return None


def initrd_kind(systemd_dir: str | Path = SYSTEMD_RUNTIME_DIR) -> Initrd:
    """systemd's initrd when its runtime directory exists (sd_booted(3)), else dracut's shell."""
    return Initrd.SYSTEMD if os.path.isdir(systemd_dir) else Initrd.SHELL


def repart_facts(sysroot: str | Path, initrd: Initrd) -> RepartFacts:
    """The definition systemd-repart --root=SYSROOT reads: the first of that name on its
    search path below `sysroot` (a file in /etc replaces the shipped one as a whole)."""
    root = str(sysroot)
    if initrd is Initrd.SHELL:
        return RepartFacts(initrd, root)
    for directory in SEARCH_DIRS:
        path = Path(root, directory, DEFINITION)
        try:
            if path.is_symlink() and os.readlink(path) == "/dev/null":
                return RepartFacts(initrd, root, str(path), masked=True)
            with path.open("rb") as f:
                text = f.read(_DEFINITION_MAX).decode("utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError:  # there, but unreadable: systemd-repart may still have read it
            return RepartFacts(initrd, root, str(path))
        if not text.strip():
            return RepartFacts(initrd, root, str(path), masked=True)
        return RepartFacts(initrd, root, str(path), size_min=size_min(text))
    return RepartFacts(initrd, root)


def scan_disks(
    sys_dir: str | Path = "/sys", *, include_virtual: bool = False, also: Sequence[str] = ()
) -> tuple[list[DiskInfo], list[str]]:
    """Every whole disk with a readable GPT, and one line per disk skipped and why.

    `also` adds disks by kernel name (say a loop device holding the root file system).
    """
    disks, skipped = [], []
    names = list_disks(sys_dir, include_virtual=include_virtual)
    for name in sorted(set(also) - set(names)):
        names.append(name)
    for name in names:
        device = f"/dev/{name}"
        try:
            table = block.read_gpt(device)
        except GptError as exc:
            skipped.append(str(exc))
            continue
        disks.append(DiskInfo(device, table, partition_nodes(name, sys_dir)))
    return disks, skipped


def discover_state(
    state: str | None,
    *,
    sysroot: str | Path = "/sysroot",
    sys_dir: str | Path = "/sys",
    efivars: str | Path = "/sys/firmware/efi/efivars",
    mountinfo_path: str | Path = mountinfo.MOUNTINFO,
    include_virtual: bool = False,
    initrd: Initrd | None = None,
) -> StateChoice:
    """Find the state partition on this machine: scan, then apply the rules.

    `initrd`: the kind this runs in (`initrd_kind()`), for the message when the chosen disk
    has no state partition; None says nothing about systemd-repart.
    """
    if state and state.startswith("/") and os.path.exists(state):
        state = os.path.realpath(state)  # /dev/disk/by-… links, where something made them
    root_disk = (
        None if state else root_disk_of(sysroot, mountinfo_path=mountinfo_path, sys_dir=sys_dir)
    )
    also = [os.path.basename(root_disk)] if root_disk else []
    if state and state.startswith("/dev/"):
        # A named device's own disk is read even when virtual (loop, …): its GPT
        # attributes (read-only, grow) still apply.
        try:
            rdev = os.stat(state).st_rdev
            named_disk = disk_of_devnum(os.major(rdev), os.minor(rdev), sys_dir)
        except OSError:
            named_disk = None
        if named_disk:
            also.append(os.path.basename(named_disk))
    disks, skipped = scan_disks(sys_dir, include_virtual=include_virtual, also=also)
    return find_state_partition(
        disks,
        cmdline_state=state,
        loader_partuuid=None if state else read_loader_partuuid(efivars),
        root_disk=root_disk,
        fs_uuid=read_fs_uuid,
        skipped=skipped,
        repart=repart_facts(sysroot, initrd) if initrd is not None and not state else None,
    )
