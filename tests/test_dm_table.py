"""The device-mapper table reload that grows a mapping without a freeze (formats/dm_table.py).

The host has no device-mapper: these tests check the packing against the kernel's UAPI
layout (linux/dm-ioctl.h) and what the kernel's populate_table() reads; the QEMU resize
tests (test_resize_qemu.py) run the ioctls on a real dm-crypt mapping.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pystate_initrd.formats import dm_table

NAME = "pystate-encrypted"
KEY_HEX = b"0123456789abcdef" * 8


def reply(params: bytes, *, start: int = 0, length: int = 2048, flags: int = 0) -> bytearray:
    """A DM_TABLE_STATUS reply as the kernel writes it into the request buffer."""
    buf = dm_table.dm_table_request(NAME)
    struct.pack_into("=I", buf, 20, 1)
    struct.pack_into("=I", buf, 28, flags)
    spec = struct.pack("=QQiI16s", start, length, 0, 0, b"crypt")
    buf[312 : 312 + len(spec)] = spec
    buf[352 : 352 + len(params) + 1] = params + b"\0"
    return buf


def kernel_view(buf: bytearray) -> tuple[dict[str, int], tuple[int, int, bytes, bytes]]:
    """What populate_table() takes from a DM_TABLE_LOAD buffer: header fields, then the one
    target (sector_start, length, type, parameters up to their NUL)."""
    version = struct.unpack_from("=3I", buf, 0)
    data_size, data_start, count = struct.unpack_from("=III", buf, 12)
    flags = struct.unpack_from("=I", buf, 28)[0]
    name = bytes(buf[48:176]).split(b"\0", 1)[0]
    assert version == (4, 0, 0) and name == NAME.encode()
    assert data_start == 312 and data_size <= len(buf)
    start, length, _status, nxt = struct.unpack_from("=QQiI", buf, data_start)
    ttype = bytes(buf[data_start + 24 : data_start + 40]).split(b"\0", 1)[0]
    params_end = buf.index(b"\0", data_start + 40)
    assert params_end < data_size  # the kernel rejects parameters running past data_size
    assert nxt % 8 == 0 and data_start + nxt <= data_size
    params = bytes(buf[data_start + 40 : params_end])
    return {"flags": flags, "count": count}, (start, length, ttype, params)


PARAMS = b"aes-xts-plain64 " + KEY_HEX + b" 0 7:0 32768 1 sector_size:4096"


def test_a_load_keeps_every_parameter_and_changes_only_the_length() -> None:
    status = reply(PARAMS, length=4096)
    target = dm_table.dm_crypt_target(status, NAME)
    assert (target.start, target.length, target.readonly) == (0, 4096, False)
    assert target.offset_sectors(status) == 32768
    load = dm_table.dm_table_load_request(NAME, target, status, 8192)
    header, spec = kernel_view(load)
    assert spec == (0, 8192, b"crypt", PARAMS)
    assert header["count"] == 1
    assert header["flags"] & (1 << 15)  # DM_SECURE_DATA: the kernel wipes its copies
    assert not header["flags"] & 1  # read-write mapping, read-write table


def test_a_read_only_mapping_gets_a_read_only_table() -> None:
    status = reply(PARAMS, flags=1)
    target = dm_table.dm_crypt_target(status, NAME)
    header, _ = kernel_view(dm_table.dm_table_load_request(NAME, target, status, 16))
    assert target.readonly and header["flags"] & 1


def test_the_resume_skips_the_file_system_freeze() -> None:
    buf = dm_table.dm_resume_request(NAME)
    flags = struct.unpack_from("=I", buf, 28)[0]
    assert flags & dm_table.DM_SKIP_LOCKFS_FLAG
    assert not flags & (1 << 1)  # no DM_SUSPEND_FLAG: this resumes, swapping tables
    assert bytes(buf[48:176]).split(b"\0", 1)[0] == NAME.encode()


@given(
    params=st.binary(min_size=1, max_size=900).filter(lambda b: b"\0" not in b),
    start=st.integers(0, 2**40),
    length=st.integers(1, 2**40),
    new_length=st.integers(1, 2**40),
    readonly=st.booleans(),
)
def test_reload_round_trip(
    params: bytes, start: int, length: int, new_length: int, readonly: bool
) -> None:
    status = reply(params, start=start, length=length, flags=int(readonly))
    target = dm_table.dm_crypt_target(status, NAME)
    load = dm_table.dm_table_load_request(NAME, target, status, new_length)
    header, spec = kernel_view(load)
    assert spec == (start, new_length, b"crypt", params)
    assert bool(header["flags"] & 1) == readonly


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: struct.pack_into("=I", b, 20, 2),  # two targets
        lambda b: struct.pack_into("=I", b, 20, 0),  # none
        lambda b: struct.pack_into("=I", b, 28, dm_table.DM_BUFFER_FULL_FLAG),
        lambda b: b.__setitem__(slice(336, 352), b"linear".ljust(16, b"\0")),
        lambda b: b.__setitem__(slice(352, len(b)), bytes(len(b) - 352)),  # no parameters
        lambda b: b.__setitem__(slice(352, len(b)), b"x" * (len(b) - 352)),  # no NUL
        lambda b: struct.pack_into("=Q", b, 320, 0),  # zero length
        lambda b: struct.pack_into("=I", b, 16, 2**31),  # data_start past the buffer
    ],
)
def test_a_table_that_is_not_one_crypt_target_is_refused(mutate: object) -> None:
    status = reply(PARAMS)
    mutate(status)  # type: ignore[operator]
    with pytest.raises(dm_table.DmTableError):
        dm_table.dm_crypt_target(status, NAME)


@given(st.binary(min_size=0, max_size=2048))
def test_any_reply_is_parsed_or_refused_with_dm_table_error(data: bytes) -> None:
    buf = bytearray(data)
    try:
        target = dm_table.dm_crypt_target(buf, NAME)
    except dm_table.DmTableError:
        return
    assert target.length > 0 and target.params.stop <= len(buf)


@pytest.mark.parametrize("name", ["", "x" * 128, "a\0b"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(dm_table.DmTableError):
        dm_table.dm_resume_request(name)


def test_an_offset_that_is_not_a_number_is_refused() -> None:
    status = reply(b"aes-xts-plain64 " + KEY_HEX + b" 0 7:0 nope")
    target = dm_table.dm_crypt_target(status, NAME)
    with pytest.raises(dm_table.DmTableError):
        target.offset_sectors(status)
