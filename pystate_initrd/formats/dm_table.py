"""device-mapper's DM_TABLE_STATUS ioctl, packed and unpacked (pure): the request for one
mapping's table, and the key of its crypt target decoded from the reply in place.

The volume key is in the table because pystate opens the mapping without the kernel
keyring (--disable-keyring); reading it back costs no process (SPEC §10).
system/devmapper.py makes the ioctl.
"""

from __future__ import annotations

import struct

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.names import DM_NAME


class DmTableError(PystateError):
    """A device-mapper table that is not the one crypt target pystate set up."""


# device-mapper's DM_TABLE_STATUS ioctl (linux/dm-ioctl.h): struct dm_ioctl is 312 bytes,
# _IOWR(0xfd, 12, struct dm_ioctl); a dm_target_spec (40 bytes) and its parameters follow.
DM_TABLE_STATUS = (3 << 30) | (312 << 16) | (0xFD << 8) | 12
_DM_STATUS_TABLE_FLAG = 1 << 4
DM_BUFFER_FULL_FLAG = 1 << 8
_DM_SECURE_DATA_FLAG = 1 << 15  # the kernel wipes its copies of the table
DM_BUFFER = 16384  # > 1024: fcntl.ioctl then works on this buffer, not a static copy
_HEX = {c: i for i, c in enumerate(b"0123456789abcdef")}


def dm_table_request(name: str) -> bytearray:
    """A DM_TABLE_STATUS request for the mapping name, in a buffer the reply goes into (pure)."""
    buf = bytearray(DM_BUFFER)
    # version 4.0.0, data_size, data_start (the reply's data follows the 312-byte header)
    struct.pack_into("=3III", buf, 0, 4, 0, 0, DM_BUFFER, 312)
    struct.pack_into("=I", buf, 28, _DM_STATUS_TABLE_FLAG | _DM_SECURE_DATA_FLAG)
    encoded = name.encode()[:127]
    buf[48 : 48 + len(encoded)] = encoded
    return buf


def dm_table_key(buf: bytearray, name: str = DM_NAME) -> bytearray:
    """The hex key of the crypt target in a DM_TABLE_STATUS reply, decoded in place (pure)."""
    try:
        data_start, count = struct.unpack_from("=II", buf, 16)
        flags = struct.unpack_from("=I", buf, 28)[0]
        if count != 1 or flags & DM_BUFFER_FULL_FLAG or data_start + 40 > len(buf):
            raise DmTableError(f"device-mapper table of {name}: {count} targets")
        target = bytes(buf[data_start + 24 : data_start + 40]).split(b"\0", 1)[0]
        if target != b"crypt":
            raise DmTableError(f"device-mapper table of {name} is {target!r}, not crypt")
        start = buf.index(b" ", data_start + 40) + 1  # after the cipher
        end = buf.index(b" ", start)
    except (struct.error, ValueError):
        raise DmTableError(f"device-mapper table of {name} is malformed") from None
    if (end - start) % 2 or not 32 <= end - start <= 256:
        raise DmTableError(f"device-mapper table of {name} holds no key (keyring?)")
    key = bytearray((end - start) // 2)
    for i in range(start, end):
        value = _HEX.get(buf[i])
        if value is None:
            key[:] = bytes(len(key))
            raise DmTableError(f"device-mapper table of {name} holds no hex key")
        key[(i - start) // 2] |= value << (4 * (1 - (i - start) % 2))
    return key
