"""File systems from their superblocks (no blkid): which one, its UUID, its size, its use.

Pure functions over the first ``HEAD_BYTES`` bytes of a device (system/block.py reads
them). Only the types pystate mounts are known: ext4 (and ext2/3, handled by the same
tools), btrfs, xfs. Every offset and magic number is here and nowhere else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

# ext2/3/4: the superblock is at 1024; offsets below are within it.
EXT4_SB = 1024
_EXT4_MAGIC = (0x38, b"\x53\xef")
_EXT4_UUID = 0x68
_EXT4_BLOCKS_LO, _EXT4_BLOCKS_HI = 0x4, 0x150
_EXT4_FREE_LO, _EXT4_FREE_HI = 0xC, 0x158
_EXT4_LOG_BLOCK_SIZE = 0x18
_EXT4_INCOMPAT = 0x60
_EXT4_FEATURE_64BIT = 0x80
_EXT4_SB_BYTES = 0x160  # through s_free_blocks_hi
# btrfs: the primary superblock is at 64 KiB.
BTRFS_SB = 0x10000
_BTRFS_MAGIC = (0x40, b"_BHRfS_M")
_BTRFS_FSID = 0x20
_BTRFS_DEV_TOTAL_BYTES = 0xD1  # dev_item.total_bytes: what this one device is used to
# xfs: the superblock is at 0.
_XFS_MAGIC = (0, b"XFSB")
_XFS_UUID = 32

HEAD_BYTES = BTRFS_SB + 0x100  # enough for every field above


@dataclass(frozen=True)
class FsInfo:
    fstype: str  # "ext4", "btrfs" or "xfs"
    uuid: uuid.UUID


@dataclass(frozen=True)
class Ext4Usage:
    block_size: int
    blocks: int
    free: int

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    @property
    def used(self) -> int:
        return (self.blocks - self.free) * self.block_size


def _has(head: bytes, base: int, magic: tuple[int, bytes]) -> bool:
    offset, value = magic
    return head[base + offset : base + offset + len(value)] == value


def _u32(head: bytes, offset: int) -> int:
    return int.from_bytes(head[offset : offset + 4], "little")


def identify(head: bytes) -> FsInfo | None:
    """The file system at the start of a device, or None when it is none pystate knows."""
    if _has(head, 0, _XFS_MAGIC):
        return FsInfo("xfs", uuid.UUID(bytes=head[_XFS_UUID : _XFS_UUID + 16]))
    if _has(head, BTRFS_SB, _BTRFS_MAGIC):
        at = BTRFS_SB + _BTRFS_FSID
        return FsInfo("btrfs", uuid.UUID(bytes=head[at : at + 16]))
    if _has(head, EXT4_SB, _EXT4_MAGIC) and len(head) >= EXT4_SB + _EXT4_UUID + 16:
        at = EXT4_SB + _EXT4_UUID
        return FsInfo("ext4", uuid.UUID(bytes=head[at : at + 16]))
    return None


def ext4_usage(head: bytes) -> Ext4Usage | None:
    """Block size, block count and free blocks of an ext4 superblock; None if it is none.

    After ``e2fsck -f`` the free count is exact; metadata (inode tables, journal) counts
    as used, which is what resize2fs has to keep.
    """
    if len(head) < EXT4_SB + _EXT4_SB_BYTES or not _has(head, EXT4_SB, _EXT4_MAGIC):
        return None
    sb = head[EXT4_SB:]
    log_block = _u32(sb, _EXT4_LOG_BLOCK_SIZE)
    if log_block > 6:
        return None
    wide = _u32(sb, _EXT4_INCOMPAT) & _EXT4_FEATURE_64BIT
    blocks = _u32(sb, _EXT4_BLOCKS_LO) | ((_u32(sb, _EXT4_BLOCKS_HI) << 32) if wide else 0)
    free = _u32(sb, _EXT4_FREE_LO) | ((_u32(sb, _EXT4_FREE_HI) << 32) if wide else 0)
    return Ext4Usage(1024 << log_block, blocks, free)


def fs_size(head: bytes, fstype: str) -> int | None:
    """The bytes a file system spans (ext4: blocks x block size; btrfs: this device's
    dev_item.total_bytes); None when head holds no such superblock."""
    if fstype == "ext4":
        usage = ext4_usage(head)
        return usage.size if usage else None
    if fstype == "btrfs":
        at = BTRFS_SB + _BTRFS_DEV_TOTAL_BYTES
        if len(head) < at + 8 or not _has(head, BTRFS_SB, _BTRFS_MAGIC):
            return None
        return int.from_bytes(head[at : at + 8], "little")
    return None
