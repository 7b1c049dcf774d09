"""Opening and creating paths beneath a root directory without following any symlink.

openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS; on kernels
without it, a walk of O_NOFOLLOW openat calls, one component at a time (SPEC §4: no
symlink is followed, neither in the state tree nor along a target under /sysroot).
"""

from __future__ import annotations

import errno
import os
import stat

from pystate_initrd.system import libc

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open path relative to dirfd with RESOLVE_* restrictions; returns an fd.

    flags are passed as given (add os.O_CLOEXEC yourself). EAGAIN, which the
    kernel returns when a rename or mount raced with a RESOLVE_BENEATH lookup,
    is retried a few times.
    """
    ffi, _ = libc.ffi_libc()
    how = ffi.new("struct open_how *", {"flags": flags, "mode": mode, "resolve": resolve})
    cpath = libc.cstr(path)
    for _attempt in range(16):
        try:
            return libc.syscall("openat2", dirfd, cpath, how, ffi.sizeof("struct open_how"))
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                libc.fail(exc.errno or errno.EIO, libc.where(dirfd, path))
    libc.fail(errno.EAGAIN, libc.where(dirfd, path))


# --- resolving paths beneath a root without following symlinks ---


def open_beneath(root_fd: int, relpath: str, flags: int, mode: int = 0) -> int:
    """Open relpath beneath root_fd: no symlink, no magic link, no escape; returns an fd.

    openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS; on
    kernels without it (ENOSYS), open_beneath_walk. O_CLOEXEC is always added.
    A symlink anywhere on the path gives ELOOP, an escape (absolute path, ".."
    above the root) EXDEV, as openat2 reports them.
    """
    flags |= os.O_CLOEXEC
    if "openat2" not in libc.missing:
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
    where = libc.where(root_fd, relpath)
    parts, last = _split_beneath(relpath, where)
    flags |= os.O_CLOEXEC
    stack = _walk(root_fd, parts, where, create_mode=None)
    try:
        if last == "..":
            if len(stack) == 1:
                libc.fail(errno.EXDEV, where)
            os.close(stack.pop())
        name = "." if last in ("", ".", "..") else last
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and _is_symlink(stack[-1], name):
                libc.fail(errno.ELOOP, where)  # O_DIRECTORY reports a symlink as ENOTDIR
            libc.fail(exc.errno or errno.EIO, where)
        if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
            os.close(fd)  # O_PATH|O_NOFOLLOW opens the symlink itself: refuse it
            libc.fail(errno.ELOOP, where)
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
    where = libc.where(root_fd, relpath)
    parts, last = _split_beneath(relpath, where)
    parts.append(last)
    for dir_fd in _walk(root_fd, parts, where, create_mode=mode)[1:]:
        os.close(dir_fd)


def _split_beneath(relpath: str, where: str) -> tuple[list[str], str]:
    """(intermediate components, last component) of a path that must stay beneath its root."""
    if not relpath:
        libc.fail(errno.ENOENT, where)
    if relpath.startswith("/"):
        libc.fail(errno.EXDEV, where)  # what openat2 says for an absolute path with RESOLVE_BENEATH
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
                    libc.fail(errno.EXDEV, where)
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
                libc.fail(errno.ENOENT, where)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and _is_symlink(dir_fd, name):
                libc.fail(errno.ELOOP, where)
            libc.fail(exc.errno or errno.EIO, where)
        try:
            os.mkdir(name, create_mode, dir_fd=dir_fd)  # mkdirat never follows a symlink
        except FileExistsError:
            pass  # made meanwhile by someone else, or a dangling symlink: the open decides
        except OSError as exc:
            libc.fail(exc.errno or errno.EIO, where)
    libc.fail(errno.ENOENT, where)


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_subdir(parent: str | os.PathLike[str], name: str, *, create: bool) -> int | None:
    """An fd of the directory ``parent/name``, never through a symlink (O_NOFOLLOW), created
    (mode 0700, the parent fsync'd for its new entry) when ``create``; None when it does not
    exist. Anything else there (a symlink, a file) raises the OSError of the open (ELOOP,
    ENOTDIR): the caller says what it refuses and why."""
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        made = False
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
                made = True
            except FileExistsError:
                pass
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
            )
        except FileNotFoundError:
            return None
        if made:
            os.fsync(parent_fd)  # the new directory's entry
        return fd
    finally:
        os.close(parent_fd)
