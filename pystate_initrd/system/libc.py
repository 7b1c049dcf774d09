"""The C library and raw system calls through cffi, and the error helpers every wrapper uses.

cffi in out-of-line ABI mode: the declarations are in _ffi_build.py; the generated
_linux_ffi.py needs only ``_cffi_backend`` at run time. Newer system calls (open_tree,
move_mount, openat2, mount_setattr) go through ``syscall()`` by number; one the kernel
answers with ENOSYS is remembered in ``missing``, so the wrappers go straight to their
fallbacks. Errors are ``OSError(errno, strerror, path)`` naming the path(s).

Imports are kept to the cheap stdlib modules: this runs at every boot.
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Any, NoReturn

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000


# Numbers of the newer system calls. Since Linux 5.1 every architecture shares
# them (asm-generic/unistd.h and arch/x86/entry/syscalls/syscall_64.tbl agree);
# only the ones checked against both headers are listed, anything else answers
# ENOSYS, which sends the helpers to their fallbacks.
# Older ones differ by architecture: fstatfs (libc's wrapper is not declared in
# _ffi_build.py) is 138 in syscall_64.tbl and 44 in asm-generic/unistd.h.
SYSCALLS: dict[str, dict[str, int]] = {
    arch: {
        "open_tree": 428,
        "move_mount": 429,
        "openat2": 437,
        "mount_setattr": 442,
        "fstatfs": fstatfs,
    }
    for arch, fstatfs in (("x86_64", 138), ("aarch64", 44))
}

# System calls the kernel answered with ENOSYS (the tests add names here to
# exercise the fallbacks on a kernel that has them all).
missing: set[str] = set()


# --- the generated FFI module ---


@functools.cache
def ffi_libc() -> tuple[Any, Any]:
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


def fd_name(fd: int) -> str:
    """A readable name for fd (its path, as /proc knows it) for error messages."""
    if fd == AT_FDCWD:
        return "."
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


def where(dirfd: int, path: str) -> str:
    if not path:
        return fd_name(dirfd)
    if path.startswith("/") or dirfd == AT_FDCWD:
        return path
    return f"{fd_name(dirfd).rstrip('/')}/{path}"


def fail(err: int, filename: str, filename2: str | None = None) -> NoReturn:
    # The five-argument form sets filename2 ("a -> b" in the message); OSError
    # picks the matching subclass (FileNotFoundError, ...) from errno.
    raise OSError(err, os.strerror(err), filename, None, filename2)


def syscall(name: str, *args: Any) -> int:
    """Call a system call by name; return its result or raise OSError without a path."""
    number = SYSCALLS.get(os.uname().machine, {}).get(name)  # = platform.machine(), cheaper
    if number is None or name in missing:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    ffi, libc = ffi_libc()
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
            missing.add(name)
        raise OSError(err, os.strerror(err))


def cstr(path: str | bytes) -> Any:
    ffi, _ = ffi_libc()
    return ffi.new("char[]", os.fsencode(path))
