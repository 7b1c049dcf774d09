"""Block devices and files: sizes, logical sectors, fallocate, No_COW, the bytes of a superblock."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import gpt, superblock
from pystate_initrd.system import libc

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# linux/fs.h: BLKSSZGET = _IO(0x12, 104); BLKGETSIZE64 = _IOR(0x12, 114, size_t) with
# the asm-generic ioctl encoding that x86_64 and aarch64 share.
BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272
# linux/fs.h: FS_IOC_GETFLAGS = _IOR('f', 1, long), FS_IOC_SETFLAGS = _IOW('f', 2, long);
# the kernel reads and writes an int through the pointer all the same (as chattr passes).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000  # chattr +C
# linux/magic.h
BTRFS_SUPER_MAGIC = 0x9123683E


# --- block devices and files ---


def _block_ioctl(fd_or_path: int | str, request: int, fmt_size: int) -> int:
    if isinstance(fd_or_path, int):
        fd, name, owned = fd_or_path, libc.fd_name(fd_or_path), False
    else:
        fd, name, owned = os.open(fd_or_path, os.O_RDONLY | os.O_CLOEXEC), fd_or_path, True
    try:
        buf = bytearray(fmt_size)
        fcntl.ioctl(fd, request, buf)
    except OSError as exc:
        libc.fail(exc.errno or errno.EIO, name)
    finally:
        if owned:
            os.close(fd)
    return int.from_bytes(buf, sys.byteorder)


def block_size_bytes(fd_or_path: int | str) -> int:
    """Size of a block device in bytes (BLKGETSIZE64); ENOTTY for anything else."""
    return _block_ioctl(fd_or_path, BLKGETSIZE64, 8)


def logical_sector_size(fd_or_path: int | str) -> int:
    """Logical sector size of a block device in bytes (BLKSSZGET)."""
    return _block_ioctl(fd_or_path, BLKSSZGET, 4)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with FALLOC_FL_* mode bits (os.posix_fallocate has none)."""
    ffi, c = libc.ffi_libc()
    while c.fallocate(fd, mode, offset, length) != 0:
        err = ffi.errno
        if err != errno.EINTR:
            libc.fail(err, libc.fd_name(fd))


def fs_magic(fd: int) -> int | None:
    """The f_type of the file system fd is on (fstatfs(2)); None where the system call is
    not known for this architecture."""
    ffi, _ = libc.ffi_libc()
    buf = ffi.new("char[]", 256)  # struct statfs is 120 bytes on LP64; f_type comes first
    try:
        libc.syscall("fstatfs", fd, buf)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return None
        libc.fail(exc.errno or errno.EIO, libc.fd_name(fd))
    return int.from_bytes(ffi.buffer(buf, 8)[:], sys.byteorder) & 0xFFFFFFFF


def _file_flags(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return int.from_bytes(buf, sys.byteorder)


def set_nocow(fd: int) -> bool:
    """Mark an empty file No_COW (chattr +C) on btrfs, so that its blocks, once allocated,
    are overwritten in place; whether the file system is btrfs (elsewhere nothing is done:
    ext4 and xfs overwrite in place anyway and refuse the flag).

    btrfs takes the flag only while the file is empty, and ignores it silently otherwise:
    so it is read back, and a file that did not take it is an OSError (EINVAL).
    """
    if fs_magic(fd) != BTRFS_SUPER_MAGIC:
        return False
    name = libc.fd_name(fd)
    try:
        flags = _file_flags(fd)
        if not flags & FS_NOCOW_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, (flags | FS_NOCOW_FL).to_bytes(4, sys.byteorder))
            flags = _file_flags(fd)
    except OSError as exc:
        libc.fail(exc.errno or errno.EIO, name)
    if not flags & FS_NOCOW_FL:
        raise OSError(errno.EINVAL, "btrfs did not take the No_COW flag (file not empty?)", name)
    return True


# --- superblocks ---


class FsProbeError(PystateError):
    """The device holds no file system pystate knows, or could not be read."""


class FsReadError(FsProbeError):
    """The device could not be read (an I/O error): nothing is known of its content."""


def read_head(device: str) -> bytes:
    """The first superblock.HEAD_BYTES bytes of a device or image, through the page cache.

    Buffered on purpose: a mounted ext4 keeps its superblock buffer in the block device's
    page cache, so this sees an online resize before the journal is checkpointed.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FsProbeError(f"cannot open {device}: {exc.strerror}") from None
    try:
        return os.pread(fd, superblock.HEAD_BYTES, 0)
    except OSError as exc:
        raise FsReadError(f"cannot read {device}: {exc.strerror}") from None
    finally:
        os.close(fd)


def probe(device: str) -> superblock.FsInfo:
    """Which file system device holds; FsProbeError when none pystate knows."""
    info = superblock.identify(read_head(device))
    if info is None:
        raise FsProbeError(
            f"{device} holds no ext4, btrfs or xfs file system",
            hint="a state partition must be formatted before first boot",
        )
    return info


# --- partition tables ---


def read_gpt(path: str | Path, sector_size: int | None = None) -> gpt.GptTable:
    """Read the GPT of an image file or a block device.

    A block device reports its logical sector size; for a file it is probed
    unless given. Every failure, including I/O errors, is a gpt.GptError naming
    `path`.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise gpt.GptError(f"{name}: cannot open: {os.strerror(exc.errno or errno.EIO)}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size, reported = block_size_bytes(fd), logical_sector_size(fd)
            sector_size = sector_size or reported
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            raise gpt.GptError(f"{name}: not a disk image or block device")

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        return gpt.parse_gpt(read_at, size, sector_size, name=name)
    except OSError as exc:
        raise gpt.GptError(f"{name}: cannot read: {os.strerror(exc.errno or errno.EIO)}") from exc
    finally:
        os.close(fd)
