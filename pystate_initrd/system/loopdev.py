"""Loop devices: attach a file with one LOOP_CONFIGURE (direct I/O), resize, detach (SPEC §5)."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass
from typing import Any

from pystate_initrd.system import libc

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
                    libc.fail(exc.errno or errno.EIO, "/dev/loop-control")
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
                        libc.fail(exc.errno or errno.EIO, backing_path, path)
                    info = _loop_status(dev_fd, path)
                    keep_open = autoclear
                    return LoopDevice(
                        path=path,
                        number=number,
                        backing_file=libc.fd_name(backing_fd),  # as /sys/.../backing_file shows
                        read_only=bool(info.lo_flags & LO_FLAGS_READ_ONLY),
                        direct_io=bool(info.lo_flags & LO_FLAGS_DIRECT_IO) and dio,
                        autoclear=autoclear,
                        fd=dev_fd if autoclear else None,
                    )
                finally:
                    if not keep_open:
                        os.close(dev_fd)
            libc.fail(errno.EBUSY, backing_path, "/dev/loop-control")
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
    libc.fail(errno.ENOENT, path)


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
    ffi, c = libc.ffi_libc()
    config = ffi.new("struct loop_config *")
    config.fd = backing_fd
    config.block_size = sector_size or 0
    name = os.fsencode(os.path.abspath(backing_path))[:63]  # what losetup -l shows
    ffi.memmove(config.info.lo_file_name, name, len(name))
    base = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    for dio in (True, False) if direct_io else (False,):
        config.info.lo_flags = base | (LO_FLAGS_DIRECT_IO if dio else 0)
        if c.ioctl(dev_fd, LOOP_CONFIGURE, config) == 0:
            return dio
        err = ffi.errno
        if not (dio and err == errno.EINVAL):
            raise OSError(err, os.strerror(err))
    raise AssertionError("unreachable")


def _loop_status(dev_fd: int, path: str) -> Any:
    ffi, c = libc.ffi_libc()
    info = ffi.new("struct loop_info64 *")
    if c.ioctl(dev_fd, LOOP_GET_STATUS64, info) != 0:
        libc.fail(ffi.errno, path)
    return info


def _loop_ioctl(dev: str | LoopDevice, request: int) -> None:
    path = dev.path if isinstance(dev, LoopDevice) else dev
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # works for read-only devices too
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        libc.fail(exc.errno or errno.EIO, path)
    finally:
        os.close(fd)


def loop_set_capacity(dev: str | LoopDevice) -> None:
    """LOOP_SET_CAPACITY: make the device's size follow its (grown) backing file."""
    _loop_ioctl(dev, LOOP_SET_CAPACITY)


def loop_detach(dev: str | LoopDevice) -> None:
    """LOOP_CLR_FD. While the device is in use the kernel defers this until the last close."""
    _loop_ioctl(dev, LOOP_CLR_FD)
