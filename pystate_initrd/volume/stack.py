"""The stack of encrypted.img, bottom up: file -> loop device (direct I/O) -> dm-crypt
``pystate-encrypted`` -> inner file system, mounted at <state>/encrypted.

Setting it up and tearing it down, the same at provisioning, at unlock and in the tests;
opening the mapping (the key) is the caller's, through system/luks.py.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.names import DM_PATH
from pystate_initrd.system import block, fsck, loopdev, luks, mount_api

INNER_TYPES = ("ext4", "btrfs")


class VolumeError(PystateError):
    """encrypted.img could not be attached, checked or mounted."""


@dataclass(frozen=True)
class Opened:
    image: Path
    loop: str
    mountpoint: Path
    uuid: str
    how: str  # "tpm2", "recovery" or "provisioned"

    def to_json(self) -> dict[str, object]:
        return {
            "image": str(self.image),
            "loop": self.loop,
            "device": DM_PATH,
            "mountpoint": str(self.mountpoint),
            "luks_uuid": self.uuid,
            "unlocked_by": self.how,
        }


def attach(image: Path, *, read_only: bool = False) -> loopdev.LoopDevice:
    try:
        return loopdev.loop_attach(str(image), read_only=read_only, direct_io=True)
    except OSError as exc:
        raise VolumeError(f"attaching {image} to a loop device failed: {exc.strerror}") from None


def check_inner(read_only: bool = False) -> tuple[str, str]:
    """The inner file system's type and fsck verdict; VolumeError stops the boot."""
    try:
        info = block.probe(DM_PATH)
    except block.FsReadError as exc:  # the disk failed, not the image's content
        raise VolumeError(
            f"encrypted.img opened, but {exc}",
            hint="nothing was written; the disk returned an I/O error (the kernel log names "
            "the sectors): check or replace it, then reboot",
        ) from None
    except block.FsProbeError:
        info = None
    if info is None or info.fstype not in INNER_TYPES:
        raise VolumeError(
            f"encrypted.img opened, but {DM_PATH} holds no ext4 or btrfs file system: "
            "the image's content is damaged",
            hint="nothing was written; restore from a backup or check it by hand",
        )
    if read_only:
        return info.fstype, "skipped (read-only)"
    try:
        result = fsck.check(DM_PATH, info.fstype)
    except fsck.FsckError as exc:
        raise VolumeError(f"the encrypted file system needs a person: {exc}") from None
    return info.fstype, str(result.verdict)


def mount_inner(mountpoint: Path, fstype: str, *, read_only: bool = False) -> Path:
    if not mountpoint.is_dir() or mountpoint.is_symlink():
        if mountpoint.is_symlink() or mountpoint.exists():
            raise VolumeError(f"{mountpoint} is not a directory; cannot mount the image there")
        mountpoint.mkdir(mode=0o700)
    try:
        mount_api.mount(
            DM_PATH, str(mountpoint), fstype, mount_api.MS_RDONLY if read_only else 0, None
        )
    except OSError as exc:
        raise VolumeError(
            f"mounting {DM_PATH} ({fstype}) on {mountpoint} failed: {exc.strerror}"
        ) from None
    return mountpoint


def teardown(loop: str | None, mountpoint: Path | None) -> None:
    """Undo mount, mapping and loop device, best effort (the boot is failing anyway)."""
    if mountpoint is not None and os.path.ismount(mountpoint):
        with contextlib.suppress(OSError):
            mount_api.umount2(str(mountpoint))
    if os.path.exists(DM_PATH):
        with contextlib.suppress(luks.LuksError):
            luks.close()
    if loop:
        with contextlib.suppress(OSError):
            loopdev.loop_detach(loop)
