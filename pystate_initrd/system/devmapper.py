"""device-mapper ioctls on /dev/mapper/control (no dmsetup process)."""

from __future__ import annotations

import fcntl
import os

from pystate_initrd.formats import dm_table
from pystate_initrd.formats.names import DM_NAME


def dm_volume_key(name: str = DM_NAME) -> bytearray:
    """The volume key of an active dm-crypt mapping, from its table: no process (SPEC §10).

    The key is in the table because the mapping was opened without the kernel keyring.
    It arrives in a bytearray, is decoded in place and the buffer wiped; caller wipes the key.
    """
    buf = dm_table.dm_table_request(name)
    try:
        _ioctl(dm_table.DM_TABLE_STATUS, buf, f"reading the device-mapper table of {name}")
        return dm_table.dm_table_key(buf, name)
    finally:
        buf[:] = bytes(dm_table.DM_BUFFER)


def _ioctl(request: int, buf: bytearray, what: str) -> None:
    """One ioctl on /dev/mapper/control; an OSError becomes a DmTableError naming ``what``."""
    try:
        fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, request, buf, True)
        finally:
            os.close(fd)
    except OSError as exc:
        raise dm_table.DmTableError(f"{what}: {exc.strerror}") from None


def resize_crypt(name: str, device_size: int | None = None, *, size: int | None = None) -> int:
    """Give the crypt mapping name a new length, without freezing its file system.

    ``size``: the mapping's new size in bytes; otherwise it ends where its device ends
    (``device_size`` bytes, the loop device's). The table is read back (key included, kept
    in bytearrays that are wiped), loaded with the new length and swapped in by a resume with
    DM_SKIP_LOCKFS: the mapping is suspended only while in-flight I/O drains, the writer's
    dirty pages are not flushed first (what ``cryptsetup resize`` does, for seconds under
    load). Returns the new length in sectors. A table that fails to swap in is cleared, so
    the mapping keeps its old one.
    """
    status = dm_table.dm_table_request(name)
    load = bytearray()
    try:
        _ioctl(dm_table.DM_TABLE_STATUS, status, f"reading the device-mapper table of {name}")
        target = dm_table.dm_crypt_target(status, name)
        if size is None:
            if device_size is None:
                raise dm_table.DmTableError("resize_crypt needs a size or the device's size")
            size = device_size - target.offset_sectors(status) * 512
        # dm-crypt's sector_size:4096 needs whole 4 KiB units; never past the device's end
        length = size // 4096 * 8
        load = dm_table.dm_table_load_request(name, target, status, length)
        _ioctl(dm_table.DM_TABLE_LOAD, load, f"loading the resized table of {name}")
        try:
            _ioctl(dm_table.DM_DEV_SUSPEND, dm_table.dm_resume_request(name), f"resuming {name}")
        except dm_table.DmTableError:
            _ioctl(dm_table.DM_TABLE_CLEAR, dm_table.dm_clear_request(name), f"clearing {name}")
            raise
        return length
    finally:
        status[:] = bytes(len(status))
        load[:] = bytes(len(load))
