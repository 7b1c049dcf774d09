"""EFI variables through efivarfs (/sys/firmware/efi/efivars): read, write, delete.

The file format is formats/efivar.py's. What efivarfs asks of a writer:
- the attributes and the data in one write();
- efivarfs creates variables that are not on the kernel's list of well-known ones as
  immutable files (FS_IMMUTABLE_FL, ``chattr +i``), so that they are not removed by accident:
  the flag is dropped (FS_IOC_GETFLAGS/FS_IOC_SETFLAGS) before a variable is deleted, as
  systemd's efi_set_variable() does. A plain directory standing in for efivarfs (the tests)
  may not know those ioctls (ENOTTY, EOPNOTSUPP): then there is no flag to drop.
- an existing variable is deleted before it is written again (as libefivar does): a plain
  directory would otherwise keep a longer old value's tail. The gap is a moment, and every
  caller here writes a variable whose absence is harmless.

Every failure is ``EfiVarsError`` naming the variable and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import efivar
from pystate_initrd.system.block import FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, fs_magic

DEFAULT_DIR = Path("/sys/firmware/efi/efivars")
FS_IMMUTABLE_FL = 0x00000010  # linux/fs.h, chattr +i
SYSFS_MAGIC = 0x62656572  # linux/magic.h: the mount point itself, efivarfs not mounted on it
_NO_FLAGS = (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class EfiVarsError(PystateError):
    """An EFI variable could not be read, written or deleted."""


def available(directory: Path = DEFAULT_DIR) -> bool:
    """Whether there are EFI variables to use: a UEFI boot with efivarfs mounted.

    A UEFI boot whose efivarfs is not mounted shows /sys/firmware/efi/efivars as an empty
    sysfs directory: not available. (Any other directory is taken as is: the tests' stand-in.)
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fs_magic(fd) != SYSFS_MAGIC
    except OSError:
        return True
    finally:
        os.close(fd)


def _fail(action: str, directory: Path, file: str, exc: OSError) -> EfiVarsError:
    hint = None
    if exc.errno in (errno.EPERM, errno.EACCES):
        hint = "EFI variables can only be changed as root"
    elif exc.errno == errno.ENOSPC:
        hint = "the firmware's variable store is full"
    elif exc.errno == errno.EROFS:
        hint = f"{directory} is mounted read-only; remount it read-write"
    return EfiVarsError(
        f"cannot {action} EFI variable {file} in {directory}: {exc.strerror or exc}", hint=hint
    )


def read_raw(directory: Path, file: str) -> bytes | None:
    """The efivarfs file's bytes (attributes + data), or None when there is no such variable."""
    path = directory / file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _fail("read", directory, file, exc) from None
    try:
        # One read: efivarfs hands the whole variable over at once. (Python retries the
        # EINTR its rate limit answers with.)
        return os.read(fd, efivar.MAX_VARIABLE_SIZE + 1)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # deleted since it was opened
            return None
        raise _fail("read", directory, file, exc) from None
    finally:
        os.close(fd)


def read(directory: Path, file: str) -> efivar.Variable | None:
    """A variable, or None when there is none; EfiVarError when its file is malformed."""
    raw = read_raw(directory, file)
    return None if raw is None else efivar.parse_variable(raw, file)


def read_string(directory: Path, file: str) -> str | None:
    """A UTF-16LE NUL-terminated string variable (LoaderEntrySelected, …), or None."""
    variable = read(directory, file)
    return None if variable is None else efivar.decode_string(variable.data, file)


def read_list(directory: Path, file: str) -> list[str] | None:
    """A list of UTF-16LE NUL-terminated strings (LoaderEntries), or None."""
    variable = read(directory, file)
    return None if variable is None else efivar.decode_list(variable.data, file)


def _drop_immutable(path: Path) -> None:
    """Clear FS_IMMUTABLE_FL on an existing file; nothing where the flags are unknown."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        buf = bytearray(4)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        except OSError as exc:
            if exc.errno in _NO_FLAGS:
                return
            raise
        flags = int.from_bytes(buf, sys.byteorder)
        if flags & FS_IMMUTABLE_FL:
            new = (flags & ~FS_IMMUTABLE_FL).to_bytes(4, sys.byteorder)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, new)
    finally:
        os.close(fd)


def delete(directory: Path, file: str) -> bool:
    """Delete a variable; whether there was one."""
    path = directory / file
    try:
        _drop_immutable(path)
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _fail("delete", directory, file, exc) from None
    return True


def write(
    directory: Path, file: str, data: bytes, attributes: int = efivar.DEFAULT_ATTRIBUTES
) -> None:
    """Set a variable (an existing one is replaced): attributes and data in one write()."""
    raw = efivar.format_variable(efivar.Variable(attributes, data))
    delete(directory, file)
    path = directory / file
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
    except OSError as exc:
        raise _fail("write", directory, file, exc) from None
    try:
        written = os.write(fd, raw)
        if written != len(raw):
            raise OSError(errno.EIO, f"short write ({written} of {len(raw)} bytes)")
    except OSError as exc:
        os.close(fd)
        # efivarfs leaves no variable behind a failed write; a plain directory would.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise _fail("write", directory, file, exc) from None
    os.close(fd)


def write_string(directory: Path, file: str, text: str) -> None:
    """Set a UTF-16LE NUL-terminated string variable with the default attributes (0x7)."""
    write(directory, file, efivar.encode_string(text, file))
