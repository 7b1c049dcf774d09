"""resize2fs's undo file, ``shrink.e2undo``, in the undo area's directory: made, inspected.

The offline shrink runs ``resize2fs -z`` with it (initrd/offline_shrink.py); the directory is
the mounted encrypted undo area (volume/scratch.py), in the host tests a plain directory.
undo_io writes each block's old contents, then its key and header, before it overwrites the
block (lib/ext2fs/undo_io.c), but never flushes. That order survives a killed process as it
is, but a power cut only if those writes reach the disk before resize2fs's own: so the file
gets the synchronous attribute (``chattr +S``: FS_SYNC_FL), which makes every write to it
durable before write(2) returns. resize2fs gets the file as ``/proc/self/fd/N`` of the
descriptor made here (O_EXCL, O_NOFOLLOW under a directory fd), so no path is looked up twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import uuid
from pathlib import Path

from pystate_initrd.formats import e2undo
from pystate_initrd.formats.names import SHRINK_UNDO as UNDO
from pystate_initrd.formats.shrink_progress import Undo

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602  # <linux/fs.h>, 64-bit
FS_SYNC_FL, FS_NOCOW_FL = 0x00000008, 0x00800000
_SCRUB_CHUNK = 1 << 20


class UndoFileIOError(OSError):
    pass


def _dir_fd(where: Path) -> int | None:
    """The undo area's directory (never through a symlink); None when it does not exist."""
    try:
        return os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def set_flags(fd: int, flags: int) -> None:
    buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
    (now,) = struct.unpack("i", buf)
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", now | flags))


def create(where: Path) -> int:
    """A new, empty, synchronous undo file (any old one removed first); its fd.

    OSError when the synchronous attribute cannot be set: without it a power cut could
    leave the file system changed and the undo file without the old blocks.
    """
    dir_fd = _dir_fd(where)
    if dir_fd is None:
        raise FileNotFoundError(2, "no undo area", str(where))
    try:
        _unlink(dir_fd)
        fd = os.open(
            UNDO,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            with contextlib.suppress(OSError):  # btrfs only; ext4 and xfs refuse the flag
                set_flags(fd, FS_NOCOW_FL)
            set_flags(fd, FS_SYNC_FL)
            os.fsync(fd)
            os.fsync(dir_fd)  # the entry is durable before resize2fs writes through it
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(dir_fd)


def open_existing(where: Path) -> int | None:
    """An fd of the undo file for reading, None when there is none; never through a symlink.

    Anything that is not a regular file raises UndoFileIOError (it is not an undo file)."""
    try:
        dir_fd = _dir_fd(where)
    except OSError as exc:
        raise UndoFileIOError(exc.errno, f"{where}: {exc.strerror}") from None
    if dir_fd is None:
        return None
    try:
        try:
            fd = os.open(
                UNDO, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UndoFileIOError(
                exc.errno, f"undo file cannot be opened: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UndoFileIOError(0, "undo file is not a regular file")
        return fd
    finally:
        os.close(dir_fd)


def inspect(where: Path, fs_uuids: set[uuid.UUID]) -> tuple[Undo, str]:
    """What the undo file is: absent, empty (nothing saved), valid for one of fs_uuids (the
    progress file's and the device's: both must name it), damaged, or foreign; and why."""
    try:
        fd = open_existing(where)
    except UndoFileIOError as exc:
        return Undo.DAMAGED, exc.strerror or str(exc)
    if fd is None:
        return Undo.ABSENT, "no undo file"
    try:
        head = os.pread(fd, e2undo.HEADER_BYTES, 0)
        try:
            header = e2undo.parse_header(head)
        except e2undo.UndoFileError as exc:
            if len(head) < e2undo.HEADER_BYTES or head.count(0) == len(head):
                return Undo.EMPTY, str(exc)
            return Undo.DAMAGED, str(exc)
        sb = os.pread(fd, e2undo.SUPERBLOCK_BYTES, header.superblock_at)
        if sb.count(0) == len(sb):
            # The header of the first block is written before its superblock copy, and the
            # file system only after both (undo_io's order): nothing was changed yet.
            return Undo.EMPTY, "undo file has no saved superblock yet"
        try:
            saved = e2undo.saved_fs_uuid(sb)
        except e2undo.UndoFileError as exc:
            return Undo.DAMAGED, str(exc)
        if saved not in fs_uuids or len(fs_uuids) != 1:
            names = ", ".join(sorted(str(u) for u in fs_uuids))
            return Undo.FOREIGN, f"undo file is for file system {saved}, not {names}"
        done = "complete" if header.finished else "incomplete"
        return Undo.VALID, f"undo file for {saved}, {header.num_keys} extents, {done}"
    finally:
        os.close(fd)


def path(where: Path) -> Path:
    return where / UNDO


def scrub_and_remove(where: Path) -> int:
    """Overwrite the undo file with zeros, fsync, unlink, fsync the directory; its size."""
    try:
        dir_fd = _dir_fd(where)
    except OSError:
        return 0
    if dir_fd is None:
        return 0
    try:
        size = 0
        try:
            fd = os.open(
                UNDO, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except FileNotFoundError:
            return 0
        except OSError:
            fd = -1  # a symlink, a directory: not ours to write; removed below
        if fd >= 0:
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    size = st.st_size
                    zeros = bytes(_SCRUB_CHUNK)
                    for at in range(0, size, _SCRUB_CHUNK):
                        os.pwrite(fd, zeros[: min(_SCRUB_CHUNK, size - at)], at)
                    os.fsync(fd)
            finally:
                os.close(fd)
        _unlink(dir_fd)
        os.fsync(dir_fd)
        return size
    finally:
        os.close(dir_fd)


def _unlink(dir_fd: int) -> None:
    try:
        os.unlink(UNDO, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        import shutil

        shutil.rmtree(UNDO, dir_fd=dir_fd)
