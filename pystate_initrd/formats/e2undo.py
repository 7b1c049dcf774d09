"""The head of an e2undo file (e2fsprogs >= 1.43, "E2UNDO02"), parsed from bytes (pure).

``resize2fs -z FILE`` saves each block's old contents in FILE before it overwrites the block,
and ``e2undo FILE DEVICE`` writes them back (lib/ext2fs/undo_io.c, misc/e2undo.c). The
offline shrink keeps one on /state (initrd/offline_shrink.py), so at the next boot pystate
reads its head before anything acts on it: a file that is not an undo file, whose header
checksum is wrong, or whose saved superblock belongs to another file system is refused here
with a reason, and e2undo is never run on it. e2undo then checks the rest itself (the saved
superblock byte for byte against the device's, each key block's and data block's crc32c).

Layout (little-endian): the header in the first 512 bytes of block 0 (magic, num_keys,
super_offset and key_offset in undo blocks, block_size, fs_block_size, sb_crc, state, feature
words, fs_offset, padding, header_crc = crc32c of the bytes before it); the file system's
superblock at block super_offset with its magic inverted (so that the undo file itself is
never taken for an ext4).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from pystate_initrd.errors import PystateError

MAGIC = b"E2UNDO02"
HEADER_BYTES = 512
SUPERBLOCK_BYTES = 1024
STATE_FINISHED = 0x1  # the undo file is complete: the tool that wrote it closed it
MIN_BLOCK, MAX_BLOCK = 1024, 1 << 20  # e2undo's own bounds
_HEADER = struct.Struct("<8sQQQIIIIIIII")  # through fs_offset's padding word
_FS_OFFSET = struct.Struct("<Q")
_EXT4_MAGIC = 0xEF53
_SB_MAGIC_AT, _SB_UUID_AT = 0x38, 0x68


class UndoFileError(PystateError):
    """Not an undo file pystate may hand to e2undo."""


@dataclass(frozen=True)
class UndoHeader:
    num_keys: int
    super_offset: int  # in undo blocks
    key_offset: int
    block_size: int
    fs_block_size: int
    finished: bool  # resize2fs closed it (it completed, or failed cleanly)

    @property
    def superblock_at(self) -> int:
        return self.super_offset * self.block_size


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c_le(seed: int, data: bytes) -> int:
    """e2fsprogs' ext2fs_crc32c_le: Castagnoli, reflected, no final inversion (pure)."""
    crc = seed
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def parse_header(data: bytes) -> UndoHeader:
    """The header from the file's first bytes (at least 512); UndoFileError for anything odd."""
    if len(data) < HEADER_BYTES:
        raise UndoFileError(f"undo file has {len(data)} bytes, not even a header: empty")
    head = data[:HEADER_BYTES]
    (magic, num_keys, super_offset, key_offset, block_size, fs_block_size, _sb_crc, state,
     _compat, incompat, rocompat, _pad) = _HEADER.unpack_from(head)  # fmt: skip
    if magic != MAGIC:
        if head.count(0) == HEADER_BYTES:
            raise UndoFileError("undo file header is all zeros: resize2fs had written nothing")
        raise UndoFileError("not an e2undo file (no E2UNDO02 magic)")
    (stored_crc,) = struct.unpack_from("<I", head, HEADER_BYTES - 4)
    if crc32c_le(0xFFFFFFFF, head[: HEADER_BYTES - 4]) != stored_crc:
        raise UndoFileError("undo file header checksum does not match: damaged")
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise UndoFileError(f"undo file block size {block_size} is out of range")
    if fs_block_size not in (1024, 2048, 4096, 65536):
        raise UndoFileError(f"undo file fs block size {fs_block_size} is not an ext4 one")
    if incompat or rocompat:
        raise UndoFileError("undo file has features this e2undo may not know")
    if super_offset < 1 or key_offset < 1 or super_offset == key_offset:
        raise UndoFileError("undo file header points its superblock or keys at block 0")
    if _FS_OFFSET.unpack_from(head, _HEADER.size)[0]:
        raise UndoFileError("undo file is for a file system at an offset: not pystate's")
    return UndoHeader(
        num_keys=num_keys,
        super_offset=super_offset,
        key_offset=key_offset,
        block_size=block_size,
        fs_block_size=fs_block_size,
        finished=bool(state & STATE_FINISHED),
    )


def saved_fs_uuid(superblock: bytes) -> uuid.UUID:
    """The UUID of the file system whose superblock the undo file saved (magic inverted)."""
    if len(superblock) < SUPERBLOCK_BYTES:
        raise UndoFileError("undo file ends before its saved superblock")
    (magic,) = struct.unpack_from("<H", superblock, _SB_MAGIC_AT)
    if magic != (~_EXT4_MAGIC & 0xFFFF):
        raise UndoFileError("undo file's saved superblock is not an ext4 one")
    return uuid.UUID(bytes=bytes(superblock[_SB_UUID_AT : _SB_UUID_AT + 16]))
