"""Which file system a block device holds, read from its superblock (no blkid).

Pure functions over bytes plus one reader. Only the types pystate mounts are
recognized: ext4 (and ext2/3, handled by the same tools), btrfs, xfs.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from pystate_initrd.errors import PystateError

# (offset of the magic, magic bytes, offset of the 16-byte UUID)
_EXT_MAGIC_OFF, _EXT_MAGIC, _EXT_UUID_OFF = 1024 + 0x38, b"\x53\xef", 1024 + 0x68
_BTRFS_MAGIC_OFF, _BTRFS_MAGIC, _BTRFS_UUID_OFF = 0x10040, b"_BHRfS_M", 0x10020
_XFS_MAGIC_OFF, _XFS_MAGIC, _XFS_UUID_OFF = 0, b"XFSB", 32

PROBE_BYTES = 0x10040 + 8


class FsProbeError(PystateError):
    """The device holds no file system pystate knows, or could not be read."""


@dataclass(frozen=True)
class FsInfo:
    fstype: str  # "ext4", "btrfs" or "xfs"
    uuid: uuid.UUID


def probe_bytes(head: bytes) -> FsInfo | None:
    """Identify the file system from the first PROBE_BYTES bytes of a device."""

    def at(offset: int, length: int) -> bytes:
        return head[offset : offset + length]

    if at(_XFS_MAGIC_OFF, 4) == _XFS_MAGIC:
        return FsInfo("xfs", uuid.UUID(bytes=at(_XFS_UUID_OFF, 16)))
    if at(_BTRFS_MAGIC_OFF, 8) == _BTRFS_MAGIC:
        return FsInfo("btrfs", uuid.UUID(bytes=at(_BTRFS_UUID_OFF, 16)))
    if at(_EXT_MAGIC_OFF, 2) == _EXT_MAGIC:
        return FsInfo("ext4", uuid.UUID(bytes=at(_EXT_UUID_OFF, 16)))
    return None


def probe(device: str) -> FsInfo:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FsProbeError(f"cannot open {device}: {exc.strerror}") from None
    try:
        head = os.pread(fd, PROBE_BYTES, 0)
    except OSError as exc:
        raise FsProbeError(f"cannot read {device}: {exc.strerror}") from None
    finally:
        os.close(fd)
    info = probe_bytes(head)
    if info is None:
        raise FsProbeError(
            f"{device} holds no ext4, btrfs or xfs file system",
            hint="a state partition must be formatted before first boot",
        )
    return info
