"""Mounting: mount(2), umount2(2), and bind mounts made on file descriptors.

bind_mount_fd and set_mount_flags mount state onto the new root without a path being
looked up again (SPEC §4): open_tree/move_mount/mount_setattr where the kernel has them
(5.12+), else mount(MS_BIND) on /proc/self/fd/N and a remount.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from pystate_initrd.system import libc

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_FORCE = 0x1
MNT_DETACH = 0x2
MNT_EXPIRE = 0x4
UMOUNT_NOFOLLOW = 0x8

OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

MOVE_MOUNT_F_SYMLINKS = 0x01
MOVE_MOUNT_F_AUTOMOUNTS = 0x02
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_SYMLINKS = 0x10
MOVE_MOUNT_T_AUTOMOUNTS = 0x20
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x00
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

# Per-mount MS_* flags that set_mount_flags/bind_mount_fd accept, as MOUNT_ATTR_* bits.
_MS_TO_ATTR = {
    MS_RDONLY: MOUNT_ATTR_RDONLY,
    MS_NOSUID: MOUNT_ATTR_NOSUID,
    MS_NODEV: MOUNT_ATTR_NODEV,
    MS_NOEXEC: MOUNT_ATTR_NOEXEC,
    MS_NODIRATIME: MOUNT_ATTR_NODIRATIME,
    MS_NOSYMFOLLOW: MOUNT_ATTR_NOSYMFOLLOW,
}
_MS_ATIME = {MS_NOATIME: MOUNT_ATTR_NOATIME, MS_STRICTATIME: MOUNT_ATTR_STRICTATIME,
             MS_RELATIME: MOUNT_ATTR_RELATIME}  # fmt: skip
# statvfs() f_flag bits are not MS_* bits (ST_RELATIME is 4096 = MS_BIND): map them.
_ST_TO_MS = {
    os.ST_RDONLY: MS_RDONLY,
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
    0x2000: MS_NOSYMFOLLOW,  # ST_NOSYMFOLLOW, not in Python 3.11's os
}

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- mount, umount2 ---


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """mount(2). Errors name source and target."""
    ffi, c = libc.ffi_libc()
    null = ffi.NULL
    rc = c.mount(
        libc.cstr(source) if source is not None else null,
        libc.cstr(target),
        libc.cstr(fstype) if fstype is not None else null,
        flags,
        libc.cstr(data) if data is not None else null,
    )
    if rc != 0:
        if source is not None and source != fstype:
            libc.fail(ffi.errno, source, target)
        libc.fail(ffi.errno, target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    ffi, c = libc.ffi_libc()
    if c.umount2(libc.cstr(target), flags) != 0:
        libc.fail(ffi.errno, target)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """open_tree(2): an fd for the mount at path (a detached copy with OPEN_TREE_CLONE)."""
    try:
        return libc.syscall("open_tree", dirfd, libc.cstr(path), flags)
    except OSError as exc:
        libc.fail(exc.errno or errno.EIO, libc.where(dirfd, path))


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
    """move_mount(2): attach (or move) the mount at from onto to."""
    try:
        libc.syscall(
            "move_mount", from_dfd, libc.cstr(from_path), to_dfd, libc.cstr(to_path), flags
        )
    except OSError as exc:
        libc.fail(
            exc.errno or errno.EIO, libc.where(from_dfd, from_path), libc.where(to_dfd, to_path)
        )


def mount_setattr(
    dirfd: int, path: str, flags: int, attr_set: int, attr_clr: int = 0, propagation: int = 0
) -> None:
    """mount_setattr(2) with MOUNT_ATTR_* bits; flags: libc.AT_EMPTY_PATH, libc.AT_RECURSIVE, ..."""
    ffi, _ = libc.ffi_libc()
    attr = ffi.new(
        "struct mount_attr *",
        {"attr_set": attr_set, "attr_clr": attr_clr, "propagation": propagation},
    )
    try:
        libc.syscall(
            "mount_setattr", dirfd, libc.cstr(path), flags, attr, ffi.sizeof("struct mount_attr")
        )
    except OSError as exc:
        libc.fail(exc.errno or errno.EIO, libc.where(dirfd, path))


# --- bind mounts on file descriptors ---


def bind_mount_fd(source_fd: int, target_fd: int, recursive: bool = False, flags: int = 0) -> None:
    """Bind-mount what source_fd refers to onto what target_fd refers to.

    Both are fds (O_PATH is enough) from open_beneath/mkdir_beneath, so no path
    is looked up again and no symlink can redirect the mount. flags are per-mount
    MS_* flags (MS_NOSUID|MS_NODEV for /home, SPEC §4) added to those of the source.

    Kernels with open_tree/move_mount/mount_setattr (5.12+): the detached clone
    gets its flags before move_mount attaches it, so the mount is never visible
    without them. Older kernels: mount(MS_BIND) on /proc/self/fd/N paths, then
    a remount of the new mount (set_mount_flags) reopened through its parent.
    """
    attr_set, attr_clr = _attrs(flags)
    if "open_tree" not in libc.missing and "move_mount" not in libc.missing:
        try:
            tree = open_tree(
                source_fd,
                "",
                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc.AT_EMPTY_PATH
                | (libc.AT_RECURSIVE if recursive else 0),
            )  # fmt: skip
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
        else:
            try:
                late_flags = 0
                if flags:
                    try:
                        mount_setattr(
                            tree, "", libc.AT_EMPTY_PATH | (libc.AT_RECURSIVE if recursive else 0),
                            attr_set, attr_clr,
                        )  # fmt: skip
                    except OSError as exc:
                        if exc.errno != errno.ENOSYS:
                            raise
                        late_flags = flags  # 5.2-5.11: set them after attaching
                move_mount(
                    tree, "", target_fd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
                )
            finally:
                os.close(tree)
            if late_flags:
                _set_flags_on_top(source_fd, target_fd, late_flags, recursive)
            return
    try:
        mount(
            f"/proc/self/fd/{source_fd}",
            f"/proc/self/fd/{target_fd}",
            None,
            MS_BIND | (MS_REC if recursive else 0),
        )
    except OSError as exc:
        libc.fail(exc.errno or errno.EIO, libc.fd_name(source_fd), libc.fd_name(target_fd))
    if flags:
        _set_flags_on_top(source_fd, target_fd, flags, recursive)


def set_mount_flags(mount_fd: int, flags: int, recursive: bool = False) -> None:
    """Add per-mount flags (MS_NOSUID, MS_NODEV, MS_RDONLY, ...) to the mount rooted at mount_fd.

    mount_setattr(2) where the kernel has it: it adds exactly these flags and
    leaves the others alone. Otherwise mount(MS_REMOUNT|MS_BIND) through
    /proc/self/fd/N, which replaces all per-mount flags, so the mount's current
    ones (statvfs) are passed along. mount_fd must be opened on the root of the
    mount *after* mounting: an fd opened on the mount point before refers to
    the mount underneath (the kernel does not cross mounts through a /proc
    magic link), and both ways refuse an fd that is not a mount root (EINVAL).
    """
    attr_set, attr_clr = _attrs(flags)
    if "mount_setattr" not in libc.missing:
        try:
            mount_setattr(
                mount_fd, "", libc.AT_EMPTY_PATH | (libc.AT_RECURSIVE if recursive else 0),
                attr_set, attr_clr,
            )  # fmt: skip
            return
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
    # MS_REMOUNT|MS_BIND has no recursive form; the boot program binds without MS_REC.
    current = os.fstatvfs(mount_fd).f_flag  # works on O_PATH fds too
    keep = 0
    for st_bit, ms_bit in _ST_TO_MS.items():
        if current & st_bit:
            keep |= ms_bit
    if not current & (os.ST_NOATIME | os.ST_RELATIME):
        keep |= MS_STRICTATIME  # statvfs has no bit for it; left out, the remount means relatime
    if flags & (MS_NOATIME | MS_STRICTATIME | MS_RELATIME):
        keep &= ~(MS_NOATIME | MS_STRICTATIME | MS_RELATIME)
    try:
        mount(None, f"/proc/self/fd/{mount_fd}", None, MS_REMOUNT | MS_BIND | keep | flags)
    except OSError as exc:
        libc.fail(exc.errno or errno.EIO, libc.fd_name(mount_fd))


_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
    "nosymfollow": MS_NOSYMFOLLOW,
}


def mount_flags(options: Iterable[str]) -> int:
    """Per-mount option names (nosuid, nodev, ro, ...) as MS_* flags; ValueError for others."""
    flags = 0
    for option in options:
        if option not in _OPTIONS:
            raise ValueError(f"unsupported mount option {option!r} (known: {', '.join(_OPTIONS)})")
        flags |= _OPTIONS[option]
    return flags


def set_mount_options(mount_fd: int, options: Iterable[str], recursive: bool = False) -> None:
    """set_mount_flags with option names, e.g. ("nosuid", "nodev")."""
    set_mount_flags(mount_fd, mount_flags(options), recursive)


def _set_flags_on_top(source_fd: int, target_fd: int, flags: int, recursive: bool) -> None:
    """set_mount_flags on the mount just stacked on target_fd, found through its parent.

    target_fd (and /proc/self/fd/N of it) still names the directory underneath;
    a fresh lookup of its name from its parent crosses into the new mount,
    which must then be the source (same device and inode), or nothing is changed.
    """
    name = os.path.basename(libc.fd_name(target_fd))
    if name in ("", ".", ".."):
        libc.fail(errno.EINVAL, libc.fd_name(target_fd))
    parent = os.open("..", _DIR_PATH, dir_fd=target_fd)
    try:
        top = os.open(name, _DIR_PATH, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        src, new = os.fstat(source_fd), os.fstat(top)
        if (src.st_dev, src.st_ino) != (new.st_dev, new.st_ino):
            libc.fail(errno.ESTALE, libc.fd_name(target_fd))  # renamed meanwhile: change nothing
        set_mount_flags(top, flags, recursive)
    finally:
        os.close(top)


def _attrs(flags: int) -> tuple[int, int]:
    """MS_* per-mount flags as (attr_set, attr_clr) for mount_setattr; ValueError for others."""
    attr_set = attr_clr = 0
    rest = flags
    for ms_bit, attr_bit in _MS_TO_ATTR.items():
        if flags & ms_bit:
            attr_set |= attr_bit
            rest &= ~ms_bit
    atime = [ms_bit for ms_bit in _MS_ATIME if flags & ms_bit]
    if len(atime) > 1:
        raise ValueError(f"conflicting atime mount flags: {flags:#x}")
    if atime:
        attr_set |= _MS_ATIME[atime[0]]
        attr_clr |= MOUNT_ATTR__ATIME  # the atime mode is a field, not a bit
        rest &= ~atime[0]
    if rest:
        raise ValueError(f"not a per-mount flag: {rest:#x}")
    return attr_set, attr_clr
