"""What the fault torture looks at on the host, between boots (root: loop devices, mounts).

``state_mounted`` mounts a disk image's state partition; ``identity`` records what must
survive every fault (the LUKS2 UUID and key digests of ``encrypted.img``, the plain marker);
``image_extents`` and ``disk_ranges`` turn a byte range of ``encrypted.img`` into byte ranges
of the disk image (where blkdebug must fail it); ``da_lockout`` puts a machine's swtpm state
into dictionary-attack lockout with tpm2-tools.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .disk import DiskLayout

IMAGE = "encrypted.img"
HOME_MARKER = "home/torture-marker"


@contextlib.contextmanager
def state_mounted(
    layout: DiskLayout, disk: Path | None = None, *, write: bool = False
) -> Iterator[Path]:
    """The disk image's state partition mounted on the host (read-only unless write)."""
    assert layout.state is not None
    mnt = Path(tempfile.mkdtemp(prefix="pystate-state."))
    # A writable loop even for reading: after a power cut the outer journal must be replayed
    # to see the last fsynced changes (a read-only device would refuse the replay). The
    # journal holds metadata only, never encrypted.img's data blocks.
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(layout.state.start),
         "--sizelimit", str(layout.state.size), str(disk or layout.path)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        subprocess.run(["mount", "-o", "rw" if write else "ro", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
        mnt.rmdir()


@dataclass(frozen=True)
class Identity:
    """What a fault must never change: None where there is no image (yet)."""

    luks_uuid: str | None
    key_digests: str | None  # the LUKS2 "digests" section: changes if the volume key does
    data_offset: int | None  # bytes from the image's start to the encrypted data
    home_marker: str | None
    names: tuple[str, ...]  # on /state

    def to_json(self) -> dict[str, object]:
        return {
            "luks_uuid": self.luks_uuid,
            "home_marker": self.home_marker,
            "names": list(self.names),
        }


def identity(layout: DiskLayout, disk: Path | None = None) -> Identity:
    from pystate_initrd.formats.luks2 import LuksError, parse_luks2_header

    with state_mounted(layout, disk) as mnt:
        names = tuple(sorted(p.name for p in mnt.iterdir()))
        marker = mnt / HOME_MARKER
        home = marker.read_text() if marker.exists() else None
        uuid = digests = offset = None
        if (mnt / IMAGE).exists():
            with open(mnt / IMAGE, "rb") as f:
                data = f.read(4 << 20)
            with contextlib.suppress(LuksError):
                header = parse_luks2_header(data)
                uuid = header.uuid
                # the digests' values, not their keyslot lists (a re-seal adds a keyslot)
                values = header.metadata.get("digests", {}).values()
                digests = json.dumps(sorted([d.get("digest"), d.get("salt")] for d in values))
                offset = int(header.metadata["segments"]["0"]["offset"])
    return Identity(uuid, digests, offset, home, names)


def image_extents(layout: DiskLayout, disk: Path | None = None) -> list[tuple[int, int, int]]:
    """encrypted.img's extents: (file offset, offset in the partition, length), bytes."""
    with state_mounted(layout, disk) as mnt:
        text = subprocess.run(
            ["filefrag", "-e", "-v", "-b512", str(mnt / IMAGE)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    return parse_filefrag(text)


def parse_filefrag(text: str) -> list[tuple[int, int, int]]:
    """``filefrag -e -v -b512`` lines ``N: l0.. l1: p0.. p1: len: flags`` -> byte extents."""
    extents = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(":")]
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        logical = int(fields[1].split("..")[0])
        physical = int(fields[2].split("..")[0])
        length = int(fields[3])
        extents.append((logical * 512, physical * 512, length * 512))
    return extents


def disk_ranges(
    extents: list[tuple[int, int, int]], partition_start: int, start: int, length: int
) -> list[tuple[int, int]]:
    """The disk image's byte ranges holding bytes [start, start+length) of the file."""
    ranges = []
    end = start + length
    for logical, physical, size in extents:
        lo, hi = max(start, logical), min(end, logical + size)
        if lo < hi:
            ranges.append((partition_start + physical + lo - logical, hi - lo))
    return ranges


def da_lockout(tpm_state: Path) -> str:
    """Put the swtpm state in dictionary-attack lockout for a day: at most one failed
    authorization, then one wrong password on a DA-protected key (a primary with a password
    and no ``noda``). Returns tpm2_getcap's lockout properties afterwards."""
    sock = tpm_state / "host.sock"
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpm_state}",
         "--server", f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl",
         "--flags", "startup-clear,not-need-init"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:path={sock}"}
    work = Path(tempfile.mkdtemp(prefix="pystate-da."))

    def tool(*argv: str, check: bool = True) -> str:
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, check=check, cwd=work
        ).stdout

    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        tool("tpm2_dictionarylockout", "-s", "-n", "1", "-t", "86400", "-l", "86400")
        tool("tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc", "-c", "da.ctx", "-p", "good")
        tool("tpm2_flushcontext", "-t")
        tool("tpm2_create", "-Q", "-C", "da.ctx", "-P", "wrong", "-G", "ecc",
             "-u", "k.pub", "-r", "k.priv", check=False)  # fmt: skip
        tool("tpm2_flushcontext", "-t")
        props = tool("tpm2_getcap", "properties-variable")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        for path in (sock, Path(f"{sock}.ctrl")):
            with contextlib.suppress(OSError):
                path.unlink()
    wanted = ("inLockout", "TPM2_PT_LOCKOUT_COUNTER", "TPM2_PT_MAX_AUTH_FAIL")
    return ", ".join(
        " ".join(line.split()) for line in props.splitlines() if any(w in line for w in wanted)
    )
