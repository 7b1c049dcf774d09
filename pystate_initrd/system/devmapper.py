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
        fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, dm_table.DM_TABLE_STATUS, buf, True)
        finally:
            os.close(fd)
        return dm_table.dm_table_key(buf, name)
    except OSError as exc:
        raise dm_table.DmTableError(
            f"reading the device-mapper table of {name}: {exc.strerror}"
        ) from None
    finally:
        buf[:] = bytes(dm_table.DM_BUFFER)
