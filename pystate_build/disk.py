"""`build.py disk`: a GPT disk image with a read-only root partition and state partitions.

Each file system is made in a file of its own from a directory (no loop mounts, no root
privileges needed beyond reading the trees), then the GPT is written with ``sfdisk`` on the
image file and the file systems are copied in at their offsets, holes kept (sparse files).

With ``esp`` (a FAT image from esp.py: systemd-boot and a UKI) partition 1 is the EFI system
partition. Then the root (Discoverable Partitions Specification type for x86-64, erofs or
squashfs); the state partitions follow (SPEC §2 type UUID, name ``state``; ext4, btrfs or xfs
with owners and modes kept); free space is left at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import run

ROOT_TYPE_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
STATE_TYPE = "24436126-bb50-47e3-b47b-21dbd57591c7"
ROOT_NAME = "root-x86-64"
STATE_NAME = "state"

MiB = 1024 * 1024
ALIGN = MiB
DEFAULT_STATE_SIZE = 384 * MiB  # xfs needs at least 300 MB
DEFAULT_FREE = 64 * MiB
GPT_RESERVED = MiB  # room for the primary and backup GPT at either end

# GPT attribute bits of the Discoverable Partitions Specification (SPEC §2).
ATTR_BITS = {"no-auto": 63, "read-only": 60, "grow-file-system": 59}


class DiskError(PystateError):
    """A disk image could not be built."""


class StateFs(StrEnum):
    EXT4 = "ext4"
    BTRFS = "btrfs"
    XFS = "xfs"


class RootFs(StrEnum):
    EROFS = "erofs"
    SQUASHFS = "squashfs"


@dataclass(frozen=True)
class Partition:
    number: int
    role: str  # "esp", "root" or "state"
    type_uuid: str
    uuid: str  # the PARTUUID, lowercase
    name: str
    start: int  # bytes from the start of the disk
    size: int  # bytes
    fs: str
    attrs: tuple[int, ...] = ()


@dataclass(frozen=True)
class DiskLayout:
    path: Path
    size: int
    sector_size: int
    disk_uuid: str
    partitions: tuple[Partition, ...] = field(default_factory=tuple)

    @property
    def esp(self) -> Partition | None:
        return next((p for p in self.partitions if p.role == "esp"), None)

    @property
    def root(self) -> Partition | None:
        return next((p for p in self.partitions if p.role == "root"), None)

    @property
    def states(self) -> tuple[Partition, ...]:
        return tuple(p for p in self.partitions if p.role == "state")

    @property
    def state(self) -> Partition | None:
        return self.states[0] if self.states else None

    def to_json(self) -> str:
        data = asdict(self)
        data["path"] = str(self.path)
        return json.dumps(data, indent=2)


def parse_size(text: str) -> int:
    """Bytes from '384M', '1G', '300MiB', '65536' (binary units, as truncate)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise DiskError(f"invalid size {text!r}", hint="use e.g. 384M or 1G")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(match[1]) * scale[match[2].upper()]


def parse_attr(text: str) -> int:
    """A GPT attribute bit from its number (48-63) or its name (no-auto, read-only, ...)."""
    bit = ATTR_BITS.get(text) if not text.isdigit() else int(text)
    if bit is None or not 0 <= bit <= 63:
        raise DiskError(
            f"invalid GPT attribute {text!r}", hint=f"use 0-63 or one of {', '.join(ATTR_BITS)}"
        )
    return bit


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# --- file systems, each in a file of its own -------------------------------------------------


def make_root_fs(src: Path, image: Path, fs: RootFs = RootFs.EROFS) -> int:
    """A read-only root file system image of ``src``; returns its size rounded up to MiB."""
    image.unlink(missing_ok=True)
    if fs is RootFs.EROFS:
        run(["mkfs.erofs", "--quiet", "-zlz4hc", str(image), str(src)])
    else:
        run(["mksquashfs", str(src), str(image), "-noappend", "-no-progress", "-quiet"])
    size = _align(image.stat().st_size)
    os.truncate(image, size)
    return size


def make_state_fs(
    src: Path, image: Path, size: int, fs: StateFs = StateFs.EXT4, sector_size: int = 512
) -> None:
    """A file system of ``size`` bytes in ``image`` holding ``src`` with owners and modes."""
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    if fs is StateFs.EXT4:
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", STATE_NAME, "-d", str(src), str(image)])
    elif fs is StateFs.BTRFS:
        run(["mkfs.btrfs", "-q", "-f", "-L", STATE_NAME, "--rootdir", str(src), str(image)])
    else:
        with tempfile.TemporaryDirectory(prefix="xfsproto.", dir=image.parent) as tmp:
            proto, fixups = write_xfs_protofile(src, Path(tmp))
            sectors = ["-s", f"size={sector_size}"]
            run(["mkfs.xfs", "-q", "-f", *sectors, "-L", STATE_NAME, "-p", str(proto), str(image)])
        if fixups:
            # The protofile cannot express the sticky bit: set those modes with xfs_db.
            commands: list[str] = []
            for path, mode in fixups:
                commands += ["-c", f"path {path}", "-c", f"write core.mode 0{mode:o}"]
            run(["xfs_db", "-x", *commands, str(image)])


_PROTO_TYPES = {
    stat.S_IFREG: "-",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFBLK: "b",
    stat.S_IFCHR: "c",
    stat.S_IFIFO: "p",
}
_PROTO_BAD = re.compile(rb"[\s:$]")


def write_xfs_protofile(src: Path, workdir: Path) -> tuple[Path, list[tuple[str, int]]]:
    """An mkfs.xfs protofile for ``src`` (xfsprogs 6.1 cannot import a directory).

    Regular files are named through symlinks in ``workdir`` so that the source path needs no
    quoting. Returns the protofile and the (path, mode) pairs whose sticky bit the protofile
    format cannot carry. Names with whitespace, ':' (a protofile comment) or a lone '$' are
    refused; sockets are skipped, as mkfs.ext4 -d does; hard links become copies.
    """
    out: list[bytes] = [b"pystate", b"0 0"]
    fixups: list[tuple[str, int]] = []
    counter = 0

    def spec(path: Path, st: os.stat_result) -> bytes:
        mode = st.st_mode
        kind = _PROTO_TYPES[stat.S_IFMT(mode)]
        suid = "u" if mode & stat.S_ISUID else "-"
        sgid = "g" if mode & stat.S_ISGID else "-"
        return f"{kind}{suid}{sgid}{mode & 0o777:03o} {st.st_uid} {st.st_gid}".encode()

    def walk(directory: Path, rel: str, depth: int) -> None:
        nonlocal counter
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            name = os.fsencode(entry.name)
            path = Path(entry.path)
            st = entry.stat(follow_symlinks=False)
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFSOCK:
                continue
            if _PROTO_BAD.search(name):
                raise DiskError(
                    f"{path}: an xfs protofile cannot hold this name",
                    hint="use --state-fs ext4 or btrfs for names with spaces, ':' or '$'",
                )
            line = b"  " * depth + name + b" " + spec(path, st)
            target = f"{rel}/{entry.name}"
            if st.st_mode & stat.S_ISVTX:
                fixups.append((target, stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode)))
            if fmt == stat.S_IFREG:
                link = workdir / f"f{counter}"
                counter += 1
                link.symlink_to(path.absolute())
                out.append(line + b" " + os.fsencode(link))
            elif fmt == stat.S_IFLNK:
                link_target = os.fsencode(os.readlink(path))
                if not link_target or _PROTO_BAD.search(link_target):
                    raise DiskError(f"{path}: an xfs protofile cannot hold this symlink target")
                out.append(line + b" " + link_target)
            elif fmt in (stat.S_IFBLK, stat.S_IFCHR):
                dev = st.st_rdev
                out.append(line + f" {os.major(dev)} {os.minor(dev)}".encode())
            elif fmt == stat.S_IFDIR:
                out.append(line)
                walk(path, target, depth + 1)
                out.append(b"  " * (depth + 1) + b"$")
            else:
                out.append(line)

    root_st = os.stat(src)
    out.append(spec(src, root_st))
    if root_st.st_mode & stat.S_ISVTX:
        fixups.append(("/", root_st.st_mode))
    walk(src, "", 1)
    out.append(b"$")
    proto = workdir / "protofile"
    proto.write_bytes(b"\n".join(out) + b"\n")
    return proto, fixups


# --- layout and assembly ----------------------------------------------------------------------


def data_segments(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """The (first, past-the-end) byte ranges of a sparse file between start and end (default:
    its size) that hold data, from SEEK_DATA/SEEK_HOLE: holes are skipped without reading."""
    end = os.fstat(fd).st_size if end is None else end
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _copy_into(src: Path, dst_fd: int, offset: int) -> None:
    """Copy src into dst at offset, only its data segments (holes stay holes)."""
    with open(src, "rb") as f:
        fd = f.fileno()
        for data, hole in data_segments(fd):
            while data < hole:
                copied = os.copy_file_range(fd, dst_fd, hole - data, data, offset + data)
                if copied == 0:
                    raise DiskError(f"short copy of {src} into the disk image")
                data += copied


def _sfdisk_script(layout: DiskLayout) -> str:
    sector = layout.sector_size
    lines = ["label: gpt", f"label-id: {layout.disk_uuid}", "unit: sectors"]
    lines.append(f"first-lba: {ALIGN // sector}")
    for p in layout.partitions:
        fields = [
            f"start={p.start // sector}",
            f"size={p.size // sector}",
            f"type={p.type_uuid}",
            f"uuid={p.uuid}",
            f'name="{p.name}"',
        ]
        if p.attrs:
            fields.append(f'attrs="{_attrs_text(p.attrs)}"')
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def _attrs_text(bits: Iterable[int]) -> str:
    """sfdisk's attrs= syntax: bit 0 as RequiredPartition, 2 as LegacyBIOSBootable, 48-63 GUID:N."""
    words, guid = [], []
    for bit in sorted(set(bits)):
        if bit >= 48:
            guid.append(str(bit))
        elif bit == 0:
            words.append("RequiredPartition")
        elif bit == 1:
            words.append("NoBlockIOProtocol")
        elif bit == 2:
            words.append("LegacyBIOSBootable")
        else:
            raise DiskError(f"GPT attribute bit {bit} is reserved; use 0-2 or 48-63")
    if guid:
        words.append("GUID:" + ",".join(guid))
    return " ".join(words)


def _partition(image: Path, script: str, sector_size: int) -> None:
    """Write the GPT with sfdisk: on the file itself for 512-byte sectors; through a loop
    device of that sector size for 4096 (sfdisk 2.38 has no --sector-size for files)."""
    argv = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel"]
    if sector_size == 512:
        run([*argv, str(image)], input=script.encode())
        return
    loop = run(["losetup", "--sector-size", str(sector_size), "--show", "-f", str(image)])
    device = loop.stdout.decode().strip()
    try:
        run([*argv, device], input=script.encode())
    finally:
        run(["losetup", "-d", device], check=False)


def build_disk(
    out: Path | str,
    root_dir: Path | str | None,
    state_dir: Path | str | None,
    *,
    state_fs: StateFs | str = StateFs.EXT4,
    root_fs: RootFs | str = RootFs.EROFS,
    size: int | None = None,
    state_size: int = DEFAULT_STATE_SIZE,
    extra_states: Sequence[Path | str] = (),
    state_attrs: Iterable[int] = (),
    free: int = DEFAULT_FREE,
    sector_size: int = 512,
    esp: Path | str | None = None,
) -> DiskLayout:
    """Build the disk image ``out``: an EFI system partition from the FAT image ``esp`` (None:
    none), root from ``root_dir`` (None: no root partition), a state
    partition from ``state_dir`` (None: none) and one more per ``extra_states`` entry, all of
    ``state_fs``; ``state_attrs`` are GPT attribute bits on the first state partition. With no
    ``size`` the disk ends ``free`` bytes after the last partition (plus the backup GPT)."""
    out = Path(out)
    state_fs = StateFs(state_fs)
    root_fs = RootFs(root_fs)
    if sector_size not in (512, 4096):
        raise DiskError(f"sector size {sector_size} is not 512 or 4096")
    state_size = _align(state_size)
    sources = [Path(d) for d in ([state_dir] if state_dir is not None else []) + list(extra_states)]
    for d in ([Path(root_dir)] if root_dir is not None else []) + sources:
        if not d.is_dir():
            raise DiskError(f"{d} is not a directory")
    if esp is not None and not Path(esp).is_file():
        raise DiskError(f"{esp}: no such EFI system partition image", hint="see build.py esp")
    out.parent.mkdir(parents=True, exist_ok=True)
    attrs = tuple(sorted(set(state_attrs)))
    if attrs:
        _attrs_text(attrs)  # validate early

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        images: list[tuple[Path, Partition]] = []
        offset = GPT_RESERVED
        if esp is not None:
            from .esp import ESP_NAME, ESP_TYPE

            esp_size = _align(Path(esp).stat().st_size)
            part = Partition(
                1, "esp", ESP_TYPE, str(uuid.uuid4()), ESP_NAME, offset, esp_size, "vfat"
            )
            images.append((Path(esp), part))
            offset += esp_size
        if root_dir is not None:
            image = work / "root.img"
            root_size = make_root_fs(Path(root_dir), image, root_fs)
            part = Partition(
                len(images) + 1,
                "root",
                ROOT_TYPE_X86_64,
                str(uuid.uuid4()),
                ROOT_NAME,
                offset,
                root_size,
                str(root_fs),
            )
            images.append((image, part))
            offset += root_size
        for i, src in enumerate(sources):
            image = work / f"state{i}.img"
            make_state_fs(src, image, state_size, state_fs, sector_size)
            part = Partition(
                len(images) + 1,
                "state",
                STATE_TYPE,
                str(uuid.uuid4()),
                STATE_NAME,
                offset,
                state_size,
                str(state_fs),
                attrs if i == 0 else (),
            )
            images.append((image, part))
            offset += state_size
        needed = offset + GPT_RESERVED
        total = _align(size) if size is not None else _align(offset + free + GPT_RESERVED)
        if total < needed:
            raise DiskError(
                f"disk size {size} is too small for its partitions",
                hint=f"at least {needed // MiB} MiB",
            )
        layout = DiskLayout(out, total, sector_size, str(uuid.uuid4()), tuple(p for _, p in images))
        tmp_out = work / "disk.img"
        with open(tmp_out, "wb") as f:
            f.truncate(total)
        _partition(tmp_out, _sfdisk_script(layout), sector_size)
        fd = os.open(tmp_out, os.O_WRONLY)
        try:
            for image, part in images:
                _copy_into(image, fd, part.start)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp_out.rename(out)
    return layout


def reread_layout(layout: DiskLayout) -> DiskLayout:
    """``layout`` as its disk's GPT says now, read with pystate's own parser: what a boot
    changed (a state partition systemd-repart made shows up with role "state" and fs "ext4",
    the format repart's definition asks for). Partitions the layout knew keep their role."""
    from pystate_initrd.system.block import read_gpt

    known = {p.uuid: p for p in layout.partitions}
    table = read_gpt(layout.path, layout.sector_size)
    parts = []
    for p in table.partitions:
        uid = str(p.part_guid)
        if uid in known:
            parts.append(known[uid])
            continue
        role = "state" if p.is_state else "other"
        parts.append(
            Partition(p.index, role, str(p.type_guid), uid, p.name, p.start, p.size, "ext4")
        )
    return replace(layout, partitions=tuple(parts))


def read_layout(image: Path | str) -> dict:  # type: ignore[type-arg]
    """``sfdisk --json`` of an image file, as a dict (for tests and humans)."""
    data = run(["sfdisk", "--json", str(image)]).stdout
    return json.loads(data)["partitiontable"]  # type: ignore[no-any-return]


def _esp_image(out: Path, uki: Path, key: str | None, cert: str | None) -> Path:
    """The ESP image beside ``out``: systemd-boot (signed with key and cert) and ``uki``."""
    from .esp import build_esp
    from .uki import SigningKey

    if bool(key) != bool(cert):
        raise DiskError("--sign-key and --sign-cert go together")
    signing = SigningKey(Path(key), Path(cert)) if key and cert else None
    return build_esp(out.with_name(out.name + ".esp"), uki, signing=signing)


def _cmd_disk(args: argparse.Namespace) -> int:
    if args.state is not None and args.no_state:
        raise DiskError("--state and --no-state exclude each other")
    if args.state is None and not args.no_state:
        raise DiskError("give --state DIR, or --no-state for a disk without a state partition")
    esp = None
    if args.esp is not None:
        esp = _esp_image(args.out, args.esp, args.sign_key, args.sign_cert)
    elif args.sign_key or args.sign_cert:
        raise DiskError("--sign-key and --sign-cert sign the ESP's systemd-boot: give --esp")
    layout = build_disk(
        args.out,
        args.root,
        args.state,
        esp=esp,
        state_fs=args.state_fs,
        root_fs=args.root_fs,
        size=parse_size(args.size) if args.size else None,
        state_size=parse_size(args.state_size),
        extra_states=args.extra_state,
        state_attrs=[parse_attr(a) for a in args.state_attr],
        free=parse_size(args.free),
        sector_size=args.sector_size,
    )
    if args.json:
        print(layout.to_json())
        return 0
    print(f"{layout.path}: {layout.size // MiB} MiB, GPT {layout.disk_uuid}")
    for p in layout.partitions:
        attrs = f" attrs={','.join(map(str, p.attrs))}" if p.attrs else ""
        print(
            f"  {p.number} {p.role:5} {p.fs:8} {p.size // MiB:5} MiB"
            f" PARTUUID={p.uuid} name={p.name}{attrs}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "disk",
        help="build a GPT disk image: read-only root + state partition(s) + free space",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="the disk image to write")
    parser.add_argument("--root", type=Path, metavar="DIR", help="tree of the root partition")
    parser.add_argument("--root-fs", choices=[f.value for f in RootFs], default=RootFs.EROFS)
    parser.add_argument("--state", type=Path, metavar="DIR", help="tree of the state partition")
    parser.add_argument("--no-state", action="store_true", help="leave out the state partition")
    parser.add_argument("--state-fs", choices=[f.value for f in StateFs], default=StateFs.EXT4)
    parser.add_argument("--state-size", default=f"{DEFAULT_STATE_SIZE // MiB}M", metavar="SIZE")
    parser.add_argument(
        "--extra-state",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="one more state partition from DIR (repeatable; to test ambiguity)",
    )
    parser.add_argument(
        "--state-attr",
        action="append",
        default=[],
        metavar="BIT",
        help=f"GPT attribute bit on the state partition: a number or {', '.join(ATTR_BITS)}",
    )
    parser.add_argument("--size", metavar="SIZE", help="total disk size (default: fit + --free)")
    parser.add_argument(
        "--free", default=f"{DEFAULT_FREE // MiB}M", metavar="SIZE", help="free space at the end"
    )
    parser.add_argument("--sector-size", type=int, choices=(512, 4096), default=512)
    parser.add_argument(
        "--esp",
        type=Path,
        metavar="UKI",
        help="an EFI system partition first: systemd-boot and this UKI (see build.py uki)",
    )
    parser.add_argument("--sign-key", metavar="KEY", help="sign the ESP's systemd-boot (PEM)")
    parser.add_argument("--sign-cert", metavar="CERT", help="certificate for --sign-key (PEM)")
    parser.add_argument("--json", action="store_true", help="print the layout as JSON")
    parser.set_defaults(func=_cmd_disk)
