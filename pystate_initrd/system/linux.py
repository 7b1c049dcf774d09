"""The Linux system calls pystate needs and Python's os module lacks.

mount/umount2, openat2, open_tree/move_mount/mount_setattr, loop devices, block
device sizes and fallocate, through cffi in out-of-line ABI mode (the
declarations are in _ffi_build.py; the generated _linux_ffi.py needs only
``_cffi_backend`` at run time). Each function is small and typed and raises
``OSError(errno, strerror, path)`` naming the path(s) it failed on.

On top of the raw calls sit the helpers the boot program uses to mount state
onto the new root without ever following a symlink (SPEC §4): open_beneath,
mkdir_beneath, bind_mount_fd, set_mount_flags, and loop_attach (SPEC §5).
Where the kernel lacks a newer call (ENOSYS) the helper falls back to an
older, equally safe way and remembers that in ``_missing`` so later calls go
straight to the fallback.

Imports are kept to the cheap stdlib modules: this runs at every boot.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

# --- constants (linux/mount.h, linux/fs.h, linux/fcntl.h, linux/openat2.h) ---

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

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

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

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# linux/loop.h
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16
LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

# linux/fs.h: BLKSSZGET = _IO(0x12, 104); BLKGETSIZE64 = _IOR(0x12, 114, size_t) with
# the asm-generic ioctl encoding that x86_64 and aarch64 share.
BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272

# Numbers of the newer system calls. Since Linux 5.1 every architecture shares
# them (asm-generic/unistd.h and arch/x86/entry/syscalls/syscall_64.tbl agree);
# only the ones checked against both headers are listed, anything else answers
# ENOSYS, which sends the helpers to their fallbacks.
_SYSCALLS: dict[str, dict[str, int]] = {
    arch: {"open_tree": 428, "move_mount": 429, "openat2": 437, "mount_setattr": 442}
    for arch in ("x86_64", "aarch64")
}

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

_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# System calls the kernel answered with ENOSYS (the tests add names here to
# exercise the fallbacks on a kernel that has them all).
_missing: set[str] = set()


# --- the generated FFI module ---


@functools.cache
def _ffi() -> tuple[Any, Any]:
    """(ffi, libc), loaded once; in a dev checkout, (re)generate _linux_ffi.py first."""
    here = os.path.dirname(os.path.abspath(__file__))
    build_py = os.path.join(here, "_ffi_build.py")
    generated = os.path.join(here, "_linux_ffi.py")
    # Inside the zipapp these stats fail and the built-in module is used as is.
    if os.path.isfile(build_py) and (
        not os.path.isfile(generated)
        or os.stat(generated).st_mtime_ns < os.stat(build_py).st_mtime_ns
    ):
        import importlib

        # By name, so build.py's import analysis does not pull the build-time
        # module (and cffi, tempfile, hashlib) into the zipapp.
        importlib.import_module(f"{__package__}._ffi_build").generate(here)
        importlib.invalidate_caches()
    try:
        from pystate_initrd.system._linux_ffi import ffi
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._linux_ffi":
            raise
        raise ImportError(
            f"{__package__}._linux_ffi is missing: the build must run "
            "'python3 -m pystate_initrd.system._ffi_build' (build.py does)"
        ) from None
    return ffi, ffi.dlopen(None)  # libc, through the process's own namespace


# --- error helpers ---


def _fd_name(fd: int) -> str:
    """A readable name for fd (its path, as /proc knows it) for error messages."""
    if fd == AT_FDCWD:
        return "."
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


def _where(dirfd: int, path: str) -> str:
    if not path:
        return _fd_name(dirfd)
    if path.startswith("/") or dirfd == AT_FDCWD:
        return path
    return f"{_fd_name(dirfd).rstrip('/')}/{path}"


def _fail(err: int, filename: str, filename2: str | None = None) -> NoReturn:
    # The five-argument form sets filename2 ("a -> b" in the message); OSError
    # picks the matching subclass (FileNotFoundError, ...) from errno.
    raise OSError(err, os.strerror(err), filename, None, filename2)


def _syscall(name: str, *args: Any) -> int:
    """Call a system call by name; return its result or raise OSError without a path."""
    number = _SYSCALLS.get(os.uname().machine, {}).get(name)  # = platform.machine(), cheaper
    if number is None or name in _missing:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    ffi, libc = _ffi()
    # syscall() is variadic: every argument must be a cdata of register width.
    cargs = [ffi.cast("long", a) if isinstance(a, int) else a for a in args]
    while True:
        result = int(libc.syscall(ffi.cast("long", number), *cargs))
        if result >= 0:
            return result
        err = ffi.errno
        if err == errno.EINTR:
            continue
        if err == errno.ENOSYS:
            _missing.add(name)
        raise OSError(err, os.strerror(err))


def _cstr(path: str | bytes) -> Any:
    ffi, _ = _ffi()
    return ffi.new("char[]", os.fsencode(path))


# --- mount, umount2 ---


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """mount(2). Errors name source and target."""
    ffi, libc = _ffi()
    null = ffi.NULL
    rc = libc.mount(
        _cstr(source) if source is not None else null,
        _cstr(target),
        _cstr(fstype) if fstype is not None else null,
        flags,
        _cstr(data) if data is not None else null,
    )
    if rc != 0:
        if source is not None and source != fstype:
            _fail(ffi.errno, source, target)
        _fail(ffi.errno, target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    ffi, libc = _ffi()
    if libc.umount2(_cstr(target), flags) != 0:
        _fail(ffi.errno, target)


# --- openat2, open_tree, move_mount, mount_setattr ---


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open path relative to dirfd with RESOLVE_* restrictions; returns an fd.

    flags are passed as given (add os.O_CLOEXEC yourself). EAGAIN, which the
    kernel returns when a rename or mount raced with a RESOLVE_BENEATH lookup,
    is retried a few times.
    """
    ffi, _ = _ffi()
    how = ffi.new("struct open_how *", {"flags": flags, "mode": mode, "resolve": resolve})
    cpath = _cstr(path)
    for _attempt in range(16):
        try:
            return _syscall("openat2", dirfd, cpath, how, ffi.sizeof("struct open_how"))
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                _fail(exc.errno or errno.EIO, _where(dirfd, path))
    _fail(errno.EAGAIN, _where(dirfd, path))


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """open_tree(2): an fd for the mount at path (a detached copy with OPEN_TREE_CLONE)."""
    try:
        return _syscall("open_tree", dirfd, _cstr(path), flags)
    except OSError as exc:
        _fail(exc.errno or errno.EIO, _where(dirfd, path))


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
    """move_mount(2): attach (or move) the mount at from onto to."""
    try:
        _syscall("move_mount", from_dfd, _cstr(from_path), to_dfd, _cstr(to_path), flags)
    except OSError as exc:
        _fail(exc.errno or errno.EIO, _where(from_dfd, from_path), _where(to_dfd, to_path))


def mount_setattr(
    dirfd: int, path: str, flags: int, attr_set: int, attr_clr: int = 0, propagation: int = 0
) -> None:
    """mount_setattr(2) with MOUNT_ATTR_* bits; flags: AT_EMPTY_PATH, AT_RECURSIVE, ..."""
    ffi, _ = _ffi()
    attr = ffi.new(
        "struct mount_attr *",
        {"attr_set": attr_set, "attr_clr": attr_clr, "propagation": propagation},
    )
    try:
        _syscall("mount_setattr", dirfd, _cstr(path), flags, attr, ffi.sizeof("struct mount_attr"))
    except OSError as exc:
        _fail(exc.errno or errno.EIO, _where(dirfd, path))


# --- resolving paths beneath a root without following symlinks ---


def open_beneath(root_fd: int, relpath: str, flags: int, mode: int = 0) -> int:
    """Open relpath beneath root_fd: no symlink, no magic link, no escape; returns an fd.

    openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS; on
    kernels without it (ENOSYS), open_beneath_walk. O_CLOEXEC is always added.
    A symlink anywhere on the path gives ELOOP, an escape (absolute path, ".."
    above the root) EXDEV, as openat2 reports them.
    """
    flags |= os.O_CLOEXEC
    if "openat2" not in _missing:
        try:
            return openat2(root_fd, relpath, flags, mode, _BENEATH)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
    return open_beneath_walk(root_fd, relpath, flags, mode)


def open_beneath_walk(root_fd: int, relpath: str, flags: int, mode: int = 0) -> int:
    """open_beneath for kernels without openat2: one O_NOFOLLOW openat per component.

    Each directory is opened O_PATH|O_DIRECTORY|O_NOFOLLOW relative to the last
    one, so a symlink is never followed and a rename elsewhere cannot redirect
    the walk; ".." is resolved lexically and may not climb above root_fd.
    Mount points are crossed, as with openat2 without RESOLVE_NO_XDEV.
    """
    where = _where(root_fd, relpath)
    parts, last = _split_beneath(relpath, where)
    flags |= os.O_CLOEXEC
    stack = _walk(root_fd, parts, where, create_mode=None)
    try:
        if last == "..":
            if len(stack) == 1:
                _fail(errno.EXDEV, where)
            os.close(stack.pop())
        name = "." if last in ("", ".", "..") else last
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and _is_symlink(stack[-1], name):
                _fail(errno.ELOOP, where)  # O_DIRECTORY reports a symlink as ENOTDIR
            _fail(exc.errno or errno.EIO, where)
        if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
            os.close(fd)  # O_PATH|O_NOFOLLOW opens the symlink itself: refuse it
            _fail(errno.ELOOP, where)
        return fd
    finally:
        for dir_fd in stack[1:]:
            os.close(dir_fd)


def mkdir_beneath(root_fd: int, relpath: str, mode: int = 0o755) -> None:
    """Create the missing directories of relpath beneath root_fd (like mkdir -p).

    No symlink is followed (ELOOP) and nothing is created outside root_fd
    (EXDEV); existing directories are kept as they are; a non-directory in the
    way gives ENOTDIR. mode is subject to the umask. Open the result with
    open_beneath.
    """
    where = _where(root_fd, relpath)
    parts, last = _split_beneath(relpath, where)
    parts.append(last)
    for dir_fd in _walk(root_fd, parts, where, create_mode=mode)[1:]:
        os.close(dir_fd)


def _split_beneath(relpath: str, where: str) -> tuple[list[str], str]:
    """(intermediate components, last component) of a path that must stay beneath its root."""
    if not relpath:
        _fail(errno.ENOENT, where)
    if relpath.startswith("/"):
        _fail(errno.EXDEV, where)  # what openat2 says for an absolute path with RESOLVE_BENEATH
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    last = parts.pop() if parts else "."
    return parts, last


def _walk(root_fd: int, parts: list[str], where: str, create_mode: int | None) -> list[int]:
    """Open each component as a directory; return the stack of fds (root_fd first, not owned)."""
    stack = [root_fd]
    try:
        for part in parts:
            if part == "..":
                if len(stack) == 1:
                    _fail(errno.EXDEV, where)
                os.close(stack.pop())
                continue
            stack.append(_open_dir(stack[-1], part, where, create_mode))
    except BaseException:
        for dir_fd in stack[1:]:
            os.close(dir_fd)
        raise
    return stack


def _open_dir(dir_fd: int, name: str, where: str, create_mode: int | None) -> int:
    for _attempt in range(8):
        try:
            return os.open(name, _DIR_PATH, dir_fd=dir_fd)
        except FileNotFoundError:
            if create_mode is None:
                _fail(errno.ENOENT, where)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and _is_symlink(dir_fd, name):
                _fail(errno.ELOOP, where)
            _fail(exc.errno or errno.EIO, where)
        try:
            os.mkdir(name, create_mode, dir_fd=dir_fd)  # mkdirat never follows a symlink
        except FileExistsError:
            pass  # made meanwhile by someone else, or a dangling symlink: the open decides
        except OSError as exc:
            _fail(exc.errno or errno.EIO, where)
    _fail(errno.ENOENT, where)


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


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
    if "open_tree" not in _missing and "move_mount" not in _missing:
        try:
            tree = open_tree(
                source_fd,
                "",
                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH
                | (AT_RECURSIVE if recursive else 0),
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
                            tree, "", AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0),
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
        _fail(exc.errno or errno.EIO, _fd_name(source_fd), _fd_name(target_fd))
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
    if "mount_setattr" not in _missing:
        try:
            mount_setattr(
                mount_fd, "", AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0),
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
        _fail(exc.errno or errno.EIO, _fd_name(mount_fd))


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
    name = os.path.basename(_fd_name(target_fd))
    if name in ("", ".", ".."):
        _fail(errno.EINVAL, _fd_name(target_fd))
    parent = os.open("..", _DIR_PATH, dir_fd=target_fd)
    try:
        top = os.open(name, _DIR_PATH, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        src, new = os.fstat(source_fd), os.fstat(top)
        if (src.st_dev, src.st_ino) != (new.st_dev, new.st_ino):
            _fail(errno.ESTALE, _fd_name(target_fd))  # renamed meanwhile: change nothing
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


# --- loop devices ---


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device, as the kernel reports it after LOOP_CONFIGURE."""

    path: str  # /dev/loopN
    number: int
    backing_file: str
    read_only: bool
    direct_io: bool  # False if direct I/O was asked for but the backing file system refused it
    autoclear: bool
    fd: int | None = None  # held open when autoclear: closing the last opener detaches

    def close(self) -> None:
        """Close the held fd (with autoclear: the device goes once nothing else uses it)."""
        if self.fd is not None:
            os.close(self.fd)
            object.__setattr__(self, "fd", None)


def loop_attach(
    backing_path: str,
    *,
    read_only: bool = False,
    direct_io: bool = True,
    sector_size: int | None = None,
    autoclear: bool = False,
) -> LoopDevice:
    """Attach backing_path to a free loop device with one LOOP_CONFIGURE.

    A device another process grabs between LOOP_CTL_GET_FREE and
    LOOP_CONFIGURE (EBUSY) is skipped for the next free one. Direct I/O may be
    impossible (a file system without O_DIRECT, a sector_size below the
    backing device's): some kernels then fail with EINVAL, and the device is
    attached buffered instead; others (6.18) attach it buffered themselves.
    Either way the result's direct_io says what the kernel actually does
    (LOOP_GET_STATUS64). Without sector_size the kernel picks one that allows
    direct I/O (the backing device's logical sector size).

    With autoclear the result holds the device open (.fd): the kernel detaches
    it when the last user closes it, so close it only once it is mounted or
    opened by dm-crypt.
    """
    backing_fd = os.open(backing_path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _attempt in range(32):
                try:
                    number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                except OSError as exc:
                    _fail(exc.errno or errno.EIO, "/dev/loop-control")
                path = f"/dev/loop{number}"
                dev_fd = _open_new_loop(path)
                keep_open = False
                try:
                    try:
                        dio = _configure_loop(
                            dev_fd, backing_fd, backing_path, read_only, direct_io,
                            sector_size, autoclear,
                        )  # fmt: skip
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:
                            continue  # lost the race for this one
                        _fail(exc.errno or errno.EIO, backing_path, path)
                    info = _loop_status(dev_fd, path)
                    keep_open = autoclear
                    return LoopDevice(
                        path=path,
                        number=number,
                        backing_file=_fd_name(backing_fd),  # as /sys/.../backing_file shows
                        read_only=bool(info.lo_flags & LO_FLAGS_READ_ONLY),
                        direct_io=bool(info.lo_flags & LO_FLAGS_DIRECT_IO) and dio,
                        autoclear=autoclear,
                        fd=dev_fd if autoclear else None,
                    )
                finally:
                    if not keep_open:
                        os.close(dev_fd)
            _fail(errno.EBUSY, backing_path, "/dev/loop-control")
        finally:
            os.close(ctl)
    finally:
        os.close(backing_fd)


def _open_new_loop(path: str) -> int:
    # Without udev, devtmpfs creates the node for a device LOOP_CTL_GET_FREE
    # just added; give it a moment.
    for _attempt in range(50):
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)  # O_RDONLY would make it read-only
        except FileNotFoundError:
            time.sleep(0.01)
    _fail(errno.ENOENT, path)


def _configure_loop(
    dev_fd: int,
    backing_fd: int,
    backing_path: str,
    read_only: bool,
    direct_io: bool,
    sector_size: int | None,
    autoclear: bool,
) -> bool:
    """LOOP_CONFIGURE; retried buffered if direct I/O is refused. Returns whether dio was asked."""
    ffi, libc = _ffi()
    config = ffi.new("struct loop_config *")
    config.fd = backing_fd
    config.block_size = sector_size or 0
    name = os.fsencode(os.path.abspath(backing_path))[:63]  # what losetup -l shows
    ffi.memmove(config.info.lo_file_name, name, len(name))
    base = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    for dio in (True, False) if direct_io else (False,):
        config.info.lo_flags = base | (LO_FLAGS_DIRECT_IO if dio else 0)
        if libc.ioctl(dev_fd, LOOP_CONFIGURE, config) == 0:
            return dio
        err = ffi.errno
        if not (dio and err == errno.EINVAL):
            raise OSError(err, os.strerror(err))
    raise AssertionError("unreachable")


def _loop_status(dev_fd: int, path: str) -> Any:
    ffi, libc = _ffi()
    info = ffi.new("struct loop_info64 *")
    if libc.ioctl(dev_fd, LOOP_GET_STATUS64, info) != 0:
        _fail(ffi.errno, path)
    return info


def _loop_ioctl(dev: str | LoopDevice, request: int) -> None:
    path = dev.path if isinstance(dev, LoopDevice) else dev
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # works for read-only devices too
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        _fail(exc.errno or errno.EIO, path)
    finally:
        os.close(fd)


def loop_set_capacity(dev: str | LoopDevice) -> None:
    """LOOP_SET_CAPACITY: make the device's size follow its (grown) backing file."""
    _loop_ioctl(dev, LOOP_SET_CAPACITY)


def loop_detach(dev: str | LoopDevice) -> None:
    """LOOP_CLR_FD. While the device is in use the kernel defers this until the last close."""
    _loop_ioctl(dev, LOOP_CLR_FD)


# --- block devices and files ---


def _block_ioctl(fd_or_path: int | str, request: int, fmt_size: int) -> int:
    if isinstance(fd_or_path, int):
        fd, name, owned = fd_or_path, _fd_name(fd_or_path), False
    else:
        fd, name, owned = os.open(fd_or_path, os.O_RDONLY | os.O_CLOEXEC), fd_or_path, True
    try:
        buf = bytearray(fmt_size)
        fcntl.ioctl(fd, request, buf)
    except OSError as exc:
        _fail(exc.errno or errno.EIO, name)
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
    ffi, libc = _ffi()
    while libc.fallocate(fd, mode, offset, length) != 0:
        err = ffi.errno
        if err != errno.EINTR:
            _fail(err, _fd_name(fd))
