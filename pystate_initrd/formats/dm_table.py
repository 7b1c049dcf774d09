"""device-mapper's DM_TABLE_STATUS ioctl, packed and unpacked (pure): the request for one
mapping's table, and the key of its crypt target decoded from the reply in place.

The volume key is in the table because pystate opens the mapping without the kernel
keyring (--disable-keyring); reading it back costs no process (SPEC §10).
system/devmapper.py makes the ioctl.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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
    params = dm_crypt_target(buf, name).params
    try:
        start = buf.index(b" ", params.start, params.stop) + 1  # after the cipher
        end = buf.index(b" ", start, params.stop)
    except ValueError:
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


# --- reloading the one crypt target with another length (a resize without a freeze) ----------

# _IOWR(0xfd, nr, struct dm_ioctl): DM_DEV_SUSPEND 6 (also resumes), DM_TABLE_LOAD 9,
# DM_TABLE_CLEAR 10.
DM_DEV_SUSPEND = (3 << 30) | (312 << 16) | (0xFD << 8) | 6
DM_TABLE_LOAD = (3 << 30) | (312 << 16) | (0xFD << 8) | 9
DM_TABLE_CLEAR = (3 << 30) | (312 << 16) | (0xFD << 8) | 10
_DM_READONLY_FLAG = 1 << 0
# Resume without freezing the file system: a table swap that only moves the mapping's end
# needs no consistent file-system image, and the freeze (the writer's dirty pages flushed
# through dm-crypt first) is what made a grow under load take seconds.
DM_SKIP_LOCKFS_FLAG = 1 << 10
_HEADER = 312
_SPEC = 40
_NAME_MAX = 127


@dataclass(frozen=True)
class CryptTarget:
    """The one target of a DM_TABLE_STATUS reply: where its parameters are in the buffer."""

    start: int  # sectors
    length: int  # sectors
    readonly: bool
    params: slice  # the parameter text in the reply buffer (it holds the key)

    def offset_sectors(self, buf: bytearray) -> int:
        """The crypt target's offset on its device (its fifth parameter), in sectors.

        Only that field is copied out: the parameters hold the key (the second field)."""
        try:
            begin = self.params.start
            for _ in range(4):
                begin = buf.index(b" ", begin, self.params.stop) + 1
            end = buf.find(b" ", begin, self.params.stop)
            return int(bytes(buf[begin : self.params.stop if end < 0 else end]))
        except ValueError:
            raise DmTableError("crypt target parameters without an offset") from None


def _header(buf: bytearray, name: str, data_size: int, flags: int, count: int) -> None:
    encoded = name.encode()
    if not encoded or len(encoded) > _NAME_MAX or b"\0" in encoded:
        raise DmTableError(f"{name!r} is not a device-mapper name")
    struct.pack_into("=3IIIII", buf, 0, 4, 0, 0, data_size, _HEADER, count, 0)
    struct.pack_into("=I", buf, 28, flags)
    buf[48 : 48 + len(encoded)] = encoded


def dm_crypt_target(buf: bytearray, name: str = DM_NAME) -> CryptTarget:
    """The crypt target of a DM_TABLE_STATUS reply (STATUS_TABLE), located, not copied."""
    try:
        data_start, count = struct.unpack_from("=II", buf, 16)
        flags = struct.unpack_from("=I", buf, 28)[0]
        if count != 1 or flags & DM_BUFFER_FULL_FLAG or data_start + _SPEC > len(buf):
            raise DmTableError(f"device-mapper table of {name}: {count} targets")
        start, length = struct.unpack_from("=QQ", buf, data_start)
        target = bytes(buf[data_start + 24 : data_start + _SPEC]).split(b"\0", 1)[0]
        if target != b"crypt":
            raise DmTableError(f"device-mapper table of {name} is {target!r}, not crypt")
        end = buf.index(b"\0", data_start + _SPEC)
    except (struct.error, ValueError):
        raise DmTableError(f"device-mapper table of {name} is malformed") from None
    if length == 0 or end == data_start + _SPEC:
        raise DmTableError(f"device-mapper table of {name} is empty")
    return CryptTarget(
        start, length, bool(flags & _DM_READONLY_FLAG), slice(data_start + _SPEC, end)
    )


def dm_table_load_request(
    name: str, target: CryptTarget, reply: bytearray, length: int
) -> bytearray:
    """A DM_TABLE_LOAD of the reply's crypt target with a new length in sectors (pure).

    The parameters (the key among them) are copied between the two buffers, never into an
    immutable object; DM_SECURE_DATA makes the kernel wipe its copies. Caller wipes both.
    """
    if length <= 0:
        raise DmTableError(f"a mapping of {length} sectors")
    params = target.params.stop - target.params.start
    spec_size = (_SPEC + params + 1 + 7) // 8 * 8
    buf = bytearray(max(DM_BUFFER, _HEADER + spec_size))
    flags = _DM_SECURE_DATA_FLAG | (_DM_READONLY_FLAG if target.readonly else 0)
    _header(buf, name, _HEADER + spec_size, flags, 1)
    struct.pack_into("=QQiI", buf, _HEADER, target.start, length, 0, spec_size)
    buf[_HEADER + 24 : _HEADER + 29] = b"crypt"
    buf[_HEADER + _SPEC : _HEADER + _SPEC + params] = reply[target.params]
    return buf


def dm_resume_request(name: str) -> bytearray:
    """DM_DEV_SUSPEND without DM_SUSPEND_FLAG: resume, swapping in the loaded table (pure)."""
    buf = bytearray(DM_BUFFER)
    _header(buf, name, DM_BUFFER, DM_SKIP_LOCKFS_FLAG, 0)
    return buf


def dm_clear_request(name: str) -> bytearray:
    """DM_TABLE_CLEAR: drop a loaded table that could not be swapped in (pure)."""
    buf = bytearray(DM_BUFFER)
    _header(buf, name, DM_BUFFER, 0, 0)
    return buf
