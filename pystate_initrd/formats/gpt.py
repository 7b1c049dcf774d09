"""Reading a GUID partition table directly, without udev or blkid (SPEC §2).

`parse_gpt` is pure: it sees the disk only through a `read_at(offset, length)`
callable, so tests can feed it bytes and hostile layouts. `system/block.read_gpt`
reads an image file or a block device with it.

What is checked, and why:
- protective MBR with an 0xEE entry (hybrid MBRs are fine): the kernel and
  libblkid ignore a GPT without one, so we must too, or we would see partitions
  nobody else sees;
- header signature, revision 1.x, size 92..sector size, CRC32 (CRC field
  zeroed), MyLBA where the header was read, AlternateLBA inside the disk;
- entry size a multiple of 128 (≤ 4096), entry count ≥ 1, array ≤ 1 MiB (a
  hostile header must not make us read gigabytes), array CRC32, array outside
  the usable area and the header;
- usable range inside the disk; every entry inside the usable range with
  first ≤ last, and no two entries overlapping.
A damaged primary (header or array) falls back to the backup header at the last
LBA (or where the primary's AlternateLBA points), and the table says so.
"""

from __future__ import annotations

import itertools
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from pystate_initrd.errors import PystateError

STATE_TYPE_GUID = uuid.UUID("24436126-bb50-47e3-b47b-21dbd57591c7")

# Attribute bits of the Discoverable Partitions Specification (SPEC §2).
NO_AUTO = 1 << 63
READ_ONLY = 1 << 60
GROW_FS = 1 << 59

SECTOR_SIZES = (512, 4096)
MAX_ENTRY_SIZE = 4096
MAX_ARRAY_BYTES = 1 << 20
HEADER_MIN_SIZE = 92
_SIGNATURE = b"EFI PART"
_ZERO_GUID = uuid.UUID(int=0)

# ioctls from <linux/fs.h>: logical sector size and size in bytes of a block device.

# Header layout (UEFI 2.10 §5.3.2), little-endian, 92 bytes.
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# Entry layout (§5.3.3): type GUID, partition GUID, first, last, attributes, name.
_ENTRY = struct.Struct("<16s16sQQQ72s")


class GptError(PystateError):
    """The GPT could not be read or is not valid."""


@dataclass(frozen=True)
class Partition:
    index: int  # 1-based slot in the entry array
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    name: str
    first_lba: int
    last_lba: int
    attributes: int
    start: int  # bytes
    size: int  # bytes

    @property
    def no_auto(self) -> bool:
        return bool(self.attributes & NO_AUTO)

    @property
    def read_only(self) -> bool:
        return bool(self.attributes & READ_ONLY)

    @property
    def grow_fs(self) -> bool:
        return bool(self.attributes & GROW_FS)

    @property
    def is_state(self) -> bool:
        return self.type_guid == STATE_TYPE_GUID

    def to_json(self) -> dict[str, object]:
        """The fields, GUIDs as lowercase strings, plus whether it is a state partition."""
        return {
            "index": self.index,
            "type_guid": str(self.type_guid),
            "part_guid": str(self.part_guid),
            "name": self.name,
            "first_lba": self.first_lba,
            "last_lba": self.last_lba,
            "attributes": self.attributes,
            "start": self.start,
            "size": self.size,
            "state": self.is_state,
        }


@dataclass(frozen=True)
class GptTable:
    sector_size: int
    disk_guid: uuid.UUID
    partitions: tuple[Partition, ...]
    disk_size: int  # bytes
    first_usable_lba: int
    last_usable_lba: int
    entry_count: int
    entry_size: int
    used_backup: bool = False
    # Why the backup was used, or that the backup is missing from a truncated image.
    warning: str | None = None

    def state_partitions(self) -> tuple[Partition, ...]:
        return tuple(p for p in self.partitions if p.is_state)

    def to_json(self) -> dict[str, object]:
        return {
            "sector_size": self.sector_size,
            "disk_guid": str(self.disk_guid),
            "disk_size": self.disk_size,
            "first_usable_lba": self.first_usable_lba,
            "last_usable_lba": self.last_usable_lba,
            "entry_count": self.entry_count,
            "entry_size": self.entry_size,
            "used_backup": self.used_backup,
            "warning": self.warning,
            "partitions": [p.to_json() for p in self.partitions],
        }


@dataclass(frozen=True)
class FreeExtent:
    """A run of usable LBAs that no partition holds."""

    first_lba: int
    last_lba: int
    start: int  # bytes
    size: int  # bytes


def free_extents(table: GptTable) -> tuple[FreeExtent, ...]:
    """The unpartitioned runs of the usable LBAs, in disk order, unaligned.

    With the partitions they cover first..last usable LBA exactly once (parse_gpt has
    refused overlaps and partitions outside the usable area).
    """
    extents: list[FreeExtent] = []
    ss = table.sector_size
    next_free = table.first_usable_lba
    for p in sorted(table.partitions, key=lambda p: p.first_lba):
        if p.first_lba > next_free:
            extents.append(
                FreeExtent(
                    next_free, p.first_lba - 1, next_free * ss, (p.first_lba - next_free) * ss
                )
            )
        next_free = max(next_free, p.last_lba + 1)
    if next_free <= table.last_usable_lba:
        count = table.last_usable_lba - next_free + 1
        extents.append(FreeExtent(next_free, table.last_usable_lba, next_free * ss, count * ss))
    return tuple(extents)


def largest_free_extent(table: GptTable) -> FreeExtent | None:
    """The largest unpartitioned run (the first of equals), None on a full disk.

    A new partition must fit in one run: this, not the sum, says whether one can be made.
    """
    extents = free_extents(table)
    return max(extents, key=lambda e: e.size) if extents else None


@dataclass(frozen=True)
class _Header:
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: uuid.UUID
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


class _Invalid(Exception):
    """One header or array is unusable; the message says why (internal)."""


ReadAt = Callable[[int, int], bytes]


def _read_exact(read_at: ReadAt, offset: int, length: int) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise _Invalid(f"truncated: {length} bytes at offset {offset} not readable")
    return data


def _check_protective_mbr(mbr: bytes) -> None:
    if mbr[510:512] != b"\x55\xaa":
        raise _Invalid("no protective MBR (boot signature 55 AA missing at offset 510)")
    types = [mbr[446 + 16 * i + 4] for i in range(4)]
    if 0xEE not in types:
        raise _Invalid("no protective MBR (no partition of type 0xEE in the MBR)")


def _parse_header(raw: bytes, lba: int, sector_size: int, total_lbas: int) -> _Header:
    """Validate the header sector read at `lba`; raise _Invalid saying what is wrong."""
    where = f"header at LBA {lba}"
    (
        signature,
        revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = _HEADER.unpack_from(raw)
    if signature != _SIGNATURE:
        raise _Invalid(f"{where}: no 'EFI PART' signature")
    if revision >> 16 != 1:
        raise _Invalid(f"{where}: unsupported revision {revision:#010x}")
    if not HEADER_MIN_SIZE <= header_size <= sector_size:
        raise _Invalid(f"{where}: header size {header_size} not within 92..{sector_size}")
    zeroed = raw[:16] + b"\0\0\0\0" + raw[20:header_size]
    if zlib.crc32(zeroed) != header_crc:
        raise _Invalid(f"{where}: header CRC32 mismatch")
    if my_lba != lba:
        raise _Invalid(f"{where}: says it is at LBA {my_lba}")
    # The primary's AlternateLBA may lie beyond a truncated image (the caller
    # warns); the backup's must point back inside the disk.
    if alternate_lba == my_lba or alternate_lba < 1 or (lba != 1 and alternate_lba >= total_lbas):
        raise _Invalid(f"{where}: alternate LBA {alternate_lba} invalid for {total_lbas} sectors")
    if entry_size < 128 or entry_size % 128 or entry_size > MAX_ENTRY_SIZE:
        raise _Invalid(f"{where}: entry size {entry_size} not a multiple of 128 in 128..4096")
    if entry_count < 1 or entry_count * entry_size > MAX_ARRAY_BYTES:
        raise _Invalid(f"{where}: {entry_count} entries of {entry_size} bytes out of bounds")
    if not 2 <= first_usable <= last_usable < total_lbas:
        raise _Invalid(
            f"{where}: usable LBAs {first_usable}..{last_usable} invalid for {total_lbas} sectors"
        )
    array_lbas = -(-entry_count * entry_size // sector_size)
    array_end = entries_lba + array_lbas - 1
    if entries_lba < 2 or array_end >= total_lbas:
        raise _Invalid(f"{where}: entry array at LBA {entries_lba}..{array_end} outside the disk")
    if entries_lba <= my_lba <= array_end:
        raise _Invalid(f"{where}: entry array overlaps the header")
    if entries_lba <= last_usable and first_usable <= array_end:
        raise _Invalid(f"{where}: entry array overlaps the usable LBAs")
    if first_usable <= my_lba <= last_usable:
        raise _Invalid(f"{where}: header lies inside the usable LBAs")
    return _Header(
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        uuid.UUID(bytes_le=disk_guid),
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    )


def _parse_entries(array: bytes, header: _Header, sector_size: int) -> tuple[Partition, ...]:
    where = f"entry array at LBA {header.entries_lba}"
    if zlib.crc32(array) != header.entries_crc:
        raise _Invalid(f"{where}: CRC32 mismatch")
    parts: list[Partition] = []
    for i in range(header.entry_count):
        off = i * header.entry_size
        type_raw, part_raw, first, last, attrs, name_raw = _ENTRY.unpack_from(array, off)
        type_guid = uuid.UUID(bytes_le=type_raw)
        if type_guid == _ZERO_GUID:
            continue
        if first > last:
            raise _Invalid(
                f"{where}: partition {i + 1} ends (LBA {last}) before it starts ({first})"
            )
        if not header.first_usable_lba <= first <= last <= header.last_usable_lba:
            raise _Invalid(
                f"{where}: partition {i + 1} spans LBA {first}..{last}, outside the usable "
                f"LBAs {header.first_usable_lba}..{header.last_usable_lba}"
            )
        units = [name_raw[j : j + 2] for j in range(0, 72, 2)]
        end = units.index(b"\0\0") if b"\0\0" in units else 36
        # Lone surrogates are hostile or broken, not a reason to fail the whole table.
        name = b"".join(units[:end]).decode("utf-16-le", errors="replace")
        parts.append(
            Partition(
                index=i + 1,
                type_guid=type_guid,
                part_guid=uuid.UUID(bytes_le=part_raw),
                name=name,
                first_lba=first,
                last_lba=last,
                attributes=attrs,
                start=first * sector_size,
                size=(last - first + 1) * sector_size,
            )
        )
    by_start = sorted(parts, key=lambda p: p.first_lba)
    for a, b in itertools.pairwise(by_start):
        if b.first_lba <= a.last_lba:
            raise _Invalid(f"{where}: partitions {a.index} and {b.index} overlap")
    return tuple(parts)


def _load(read_at: ReadAt, lba: int, sector_size: int, total: int) -> tuple[_Header, bytes]:
    """The header at `lba` and its entry array, both validated (header first)."""
    raw = _read_exact(read_at, lba * sector_size, sector_size)
    header = _parse_header(raw, lba, sector_size, total)
    array = _read_exact(
        read_at, header.entries_lba * sector_size, header.entry_count * header.entry_size
    )
    return header, array


def _table(
    header: _Header,
    array: bytes,
    sector_size: int,
    size: int,
    *,
    warning: str | None,
    used_backup: bool,
) -> GptTable:
    return GptTable(
        sector_size=sector_size,
        disk_guid=header.disk_guid,
        partitions=_parse_entries(array, header, sector_size),
        disk_size=size,
        first_usable_lba=header.first_usable_lba,
        last_usable_lba=header.last_usable_lba,
        entry_count=header.entry_count,
        entry_size=header.entry_size,
        used_backup=used_backup,
        warning=warning,
    )


def _parse_with(read_at: ReadAt, size: int, sector_size: int) -> GptTable:
    """Parse assuming one sector size; raise _Invalid with both headers' faults."""
    total = size // sector_size
    if total < 3:
        raise _Invalid(f"{size} bytes is too small for a GPT with {sector_size}-byte sectors")
    # An I/O error on the first block takes the MBR and the primary with it: a damaged
    # primary like any other, whose backup's signature and CRCs vouch for it. A readable
    # MBR that is not protective still refuses the disk.
    try:
        mbr: bytes | None = _read_exact(read_at, 0, 512)
    except OSError as exc:
        mbr, unreadable = None, f"unreadable ({exc.strerror or exc})"
    if mbr is not None:
        _check_protective_mbr(mbr)
    hint: int | None = None
    try:
        if mbr is None:
            raise _Invalid(unreadable)
        header, array = _load(read_at, 1, sector_size, total)
        hint = header.alternate_lba
        warning = None
        if hint >= total:
            warning = (
                f"backup GPT header expected at LBA {hint} lies beyond the end of the disk "
                f"({total} sectors): truncated image?"
            )
        return _table(header, array, sector_size, size, warning=warning, used_backup=False)
    except _Invalid as exc:
        primary_fault = str(exc)
    except OSError as exc:
        primary_fault = f"unreadable ({exc.strerror or exc})"
    faults = [f"primary {primary_fault}"]
    # The primary's AlternateLBA is a second place to look (an image grown after
    # partitioning keeps its backup at the old end); the backup's CRC vouches for it.
    for lba in dict.fromkeys(x for x in (total - 1, hint) if x is not None and 1 < x < total):
        try:
            header, array = _load(read_at, lba, sector_size, total)
            warning = f"primary GPT damaged ({primary_fault}); using the backup at LBA {lba}"
            return _table(header, array, sector_size, size, warning=warning, used_backup=True)
        except _Invalid as exc:
            faults.append(f"backup {exc}")
        except OSError as exc:
            faults.append(f"backup at LBA {lba} unreadable ({exc.strerror or exc})")
    raise _Invalid("; ".join(faults))


def _signed(read_at: ReadAt, size: int, sector_size: int) -> bool:
    """Whether LBA 1 or the last LBA starts with 'EFI PART' for this sector size."""
    last = size // sector_size - 1
    for lba in (1, last):
        try:
            if lba >= 1 and read_at(lba * sector_size, 8) == _SIGNATURE:
                return True
        except OSError:  # unreadable there: the other copy may still be signed
            continue
    return False


def parse_gpt(
    read_at: ReadAt, size: int, sector_size: int | None = None, *, name: str = "disk"
) -> GptTable:
    """Parse the GPT of a disk of `size` bytes seen through `read_at(offset, length)`.

    `read_at` returns fewer bytes than asked only at the end of the disk. With no
    `sector_size` (an image file), 512 and 4096 are tried, those with an 'EFI
    PART' signature at LBA 1 or at the last LBA first. `name` names the disk in
    errors. Raises GptError for anything that is not a valid GPT.
    """
    if sector_size is not None and sector_size not in SECTOR_SIZES:
        raise GptError(f"{name}: unsupported logical sector size {sector_size}")
    if size < 0:
        raise GptError(f"{name}: negative size {size}")
    candidates = [sector_size] if sector_size is not None else list(SECTOR_SIZES)
    faults: list[str] = []
    try:
        signed = [ss for ss in candidates if _signed(read_at, size, ss)]
        if sector_size is None and not signed:
            raise GptError(
                f"{name}: no GPT found (no 'EFI PART' header for 512- or 4096-byte sectors)"
            )
        for ss in signed + [ss for ss in candidates if ss not in signed]:
            try:
                return _parse_with(read_at, size, ss)
            except _Invalid as exc:
                faults.append(f"{ss}-byte sectors: {exc}")
    except (OSError, struct.error, ValueError) as exc:  # read_at failures and the like
        raise GptError(f"{name}: cannot read the partition table: {exc}") from exc
    # Only the most plausible sector size's fault: the others would be noise.
    raise GptError(f"{name}: no valid GPT ({faults[0]})")
