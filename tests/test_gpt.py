"""GPT reading, with util-linux sfdisk as the oracle (SPEC §2).

Random layouts are written by the real `sfdisk` and read back both by
`read_gpt` and by `sfdisk --json`; 4096-byte sectors go through a loop device
with `losetup --sector-size 4096` (sfdisk cannot set a sector size on a file).
Damage and hostile headers are made by patching real images and re-computing
their CRCs, so the checks behind the CRCs are reached too.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.gpt import (
    GROW_FS,
    NO_AUTO,
    READ_ONLY,
    STATE_TYPE_GUID,
    GptError,
    GptTable,
    Partition,
    free_extents,
    largest_free_extent,
    parse_gpt,
)
from pystate_initrd.system.block import read_gpt

pytestmark = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices")

LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
SWAP = uuid.UUID("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f")
_NAMED_BITS = {0: "RequiredPartition", 1: "NoBlockIOProtocol", 2: "LegacyBIOSBootable"}
_HDR = struct.Struct("<8sIIIIQQQQ16sQIII")
_HDR_FIELDS = (
    "signature revision header_size header_crc reserved my_lba alternate_lba first_usable "
    "last_usable disk_guid entries_lba entry_count entry_size entries_crc"
).split()


# ---------------------------------------------------------------- sfdisk helpers


def _sh(argv: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{argv} failed: {proc.stderr}\n{stdin}"
    return proc.stdout


@contextlib.contextmanager
def loop_device(image: Path, sector_size: int = 512) -> Iterator[str]:
    dev = _sh(["losetup", "--show", "-f", "--sector-size", str(sector_size), str(image)]).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@dataclass(frozen=True)
class PartSpec:
    slot: int
    start: int
    size: int
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    name: str
    attributes: int


@dataclass(frozen=True)
class Layout:
    sector_size: int
    total_lbas: int
    table_length: int
    first_lba: int
    disk_guid: uuid.UUID
    parts: tuple[PartSpec, ...]


def attrs_text(bits: int) -> str:
    words = [_NAMED_BITS[b] for b in sorted(_NAMED_BITS) if bits >> b & 1]
    guid = [str(b) for b in range(48, 64) if bits >> b & 1]
    return " ".join(words + ([f"GUID:{','.join(guid)}"] if guid else []))


def attrs_value(text: str) -> int:
    value = 0
    for word in text.split():
        if word.startswith("GUID:"):
            for b in word[5:].split(","):
                value |= 1 << int(b)
        else:
            value |= 1 << {v: k for k, v in _NAMED_BITS.items()}[word]
    return value


def sfdisk_script(layout: Layout, device: str) -> str:
    sep = "p" if device[-1].isdigit() else ""
    lines = [
        "label: gpt",
        f"label-id: {layout.disk_guid}",
        f"table-length: {layout.table_length}",
        f"first-lba: {layout.first_lba}",
        "",
    ]
    for p in layout.parts:
        fields = [
            f"start={p.start}",
            f"size={p.size}",
            f"type={p.type_guid}",
            f"uuid={p.part_guid}",
            f'name="{p.name}"',
        ]
        if p.attributes:
            fields.append(f'attrs="{attrs_text(p.attributes)}"')
        lines.append(f"{device}{sep}{p.slot} : " + ", ".join(fields))
    return "\n".join(lines) + "\n"


def sfdisk_write(device: str, script: str) -> None:
    # No re-read: the kernel need not see the partitions, and re-reading a loop device is slow.
    _sh(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", device], script)


def sfdisk_json(device: str) -> dict[str, object]:
    table: dict[str, object] = json.loads(_sh(["sfdisk", "--json", device]))["partitiontable"]
    return table


def make_image(path: Path, layout: Layout) -> None:
    """Write `layout` to the file `path` with sfdisk (via a loop device for 4096 sectors)."""
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(layout.total_lbas * layout.sector_size)
    if layout.sector_size == 512:
        sfdisk_write(str(path), sfdisk_script(layout, str(path)))
    else:
        with loop_device(path, layout.sector_size) as dev:
            sfdisk_write(dev, sfdisk_script(layout, dev))


def assert_matches_sfdisk(table: GptTable, js: dict[str, object]) -> None:
    """Field by field against `sfdisk --json`."""
    assert table.sector_size == js["sectorsize"]
    assert table.disk_guid == uuid.UUID(str(js["id"]))
    assert table.first_usable_lba == js["firstlba"]
    assert table.last_usable_lba == js["lastlba"]
    assert table.entry_count == int(str(js.get("table-length", 128)))
    parts = js.get("partitions", [])
    assert isinstance(parts, list)
    expected = {int(re.findall(r"\d+$", p["node"])[0]): p for p in parts}
    assert [p.index for p in table.partitions] == sorted(expected)
    for p in table.partitions:
        e = expected[p.index]
        assert p.first_lba == e["start"]
        assert p.last_lba == e["start"] + e["size"] - 1
        assert p.start == e["start"] * table.sector_size
        assert p.size == e["size"] * table.sector_size
        assert p.type_guid == uuid.UUID(e["type"])
        assert p.part_guid == uuid.UUID(e["uuid"])
        assert p.name == e.get("name", "")
        assert p.attributes == attrs_value(e.get("attrs", ""))


def assert_matches_layout(table: GptTable, layout: Layout) -> None:
    """And against what we asked sfdisk to write, so a quirk of both cannot hide."""
    assert table.disk_guid == layout.disk_guid
    got = {p.index: p for p in table.partitions}
    assert sorted(got) == sorted(p.slot for p in layout.parts)
    for spec in layout.parts:
        p = got[spec.slot]
        assert (p.first_lba, p.last_lba) == (spec.start, spec.start + spec.size - 1)
        assert (p.type_guid, p.part_guid) == (spec.type_guid, spec.part_guid)
        assert (p.name, p.attributes) == (spec.name, spec.attributes)


# ---------------------------------------------------------------- random layouts

# sfdisk silently drops names with characters outside the BMP; those are tested by patching.
_NAME_CHARS = st.characters(
    min_codepoint=0x20,
    max_codepoint=0xFFFF,
    exclude_categories=("Cs", "Cc", "Cn", "Zl", "Zp"),
    exclude_characters='"\\',
)
_ATTR_BITS = [0, 1, 2, *range(48, 64)]


@st.composite
def layouts(draw: st.DrawFn, sector_size: int) -> Layout:
    table_length = draw(st.sampled_from([4, 8, 16, 56, 128, 128, 128, 129, 200, 256]))
    array_lbas = -(-table_length * 128 // sector_size)
    first_lba = 2 + array_lbas + draw(st.integers(0, 40))
    max_total = 40_000 if sector_size == 512 else 5_000
    total = draw(st.integers(first_lba + 2 * array_lbas + 40, max_total))
    last_usable = total - 2 - array_lbas
    count = draw(st.integers(0, min(table_length, 12)))
    slots = draw(
        st.lists(st.integers(1, table_length), min_size=count, max_size=count, unique=True)
    )
    parts = []
    pos = first_lba
    for slot in slots:
        start = pos + draw(st.integers(0, 40))
        size = draw(st.integers(1, 400))
        if start + size - 1 > last_usable:
            break
        pos = start + size
        bits = draw(st.lists(st.sampled_from(_ATTR_BITS), max_size=5))
        parts.append(
            PartSpec(
                slot=slot,
                start=start,
                size=size,
                type_guid=draw(
                    st.sampled_from([STATE_TYPE_GUID, STATE_TYPE_GUID, LINUX, ESP, SWAP])
                    | st.uuids(version=4)
                ),
                part_guid=draw(st.uuids(version=4)),
                name=draw(st.text(_NAME_CHARS, max_size=36)),
                attributes=sum({1 << b for b in bits}),
            )
        )
    return Layout(sector_size, total, table_length, first_lba, draw(st.uuids()), tuple(parts))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(512))
def test_random_layouts_512(tmp_path_factory: pytest.TempPathFactory, layout: Layout) -> None:
    image = tmp_path_factory.getbasetemp() / "random512.img"
    make_image(image, layout)
    table = read_gpt(image)
    assert_matches_sfdisk(table, sfdisk_json(str(image)))
    assert_matches_layout(table, layout)
    assert table.sector_size == 512 and not table.used_backup and table.warning is None


@needs_root
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(4096))
def test_random_layouts_4096(tmp_path_factory: pytest.TempPathFactory, layout: Layout) -> None:
    image = tmp_path_factory.getbasetemp() / "random4k.img"
    image.unlink(missing_ok=True)
    with image.open("wb") as f:
        f.truncate(layout.total_lbas * 4096)
    with loop_device(image, 4096) as dev:
        sfdisk_write(dev, sfdisk_script(layout, dev))
        from_device = read_gpt(dev)  # sector size from BLKSSZGET
        assert_matches_sfdisk(from_device, sfdisk_json(dev))
    from_file = read_gpt(image)  # sector size probed
    assert from_file == from_device
    assert_matches_layout(from_file, layout)
    assert from_file.sector_size == 4096


# ---------------------------------------------------------------- fixed images


def _base_layout(sector_size: int, table_length: int = 128) -> Layout:
    # Small, so that fuzzing copies little: two arrays, two headers and 100 sectors.
    array_lbas = -(-table_length * 128 // sector_size)
    total = 2 * array_lbas + 102
    first = 2 + array_lbas
    return Layout(
        sector_size,
        total,
        table_length,
        first,
        uuid.UUID("11111111-2222-3333-4444-555555555555"),
        (
            PartSpec(1, first, 10, ESP, uuid.uuid4(), "esp", READ_ONLY),
            PartSpec(2, first + 10, 20, STATE_TYPE_GUID, uuid.uuid4(), "state", GROW_FS),
            PartSpec(table_length, first + 90, 5, LINUX, uuid.uuid4(), "последний", NO_AUTO),
        ),
    )


@functools.cache
def base_image(sector_size: int, table_length: int = 128) -> tuple[bytes, Layout]:
    """A real sfdisk-made image, cached as bytes (tests patch copies in memory)."""
    layout = _base_layout(sector_size, table_length)
    path = Path(f"/tmp/pystate-test-gpt-{os.getpid()}-{sector_size}-{table_length}.img")
    try:
        make_image(path, layout)
        return path.read_bytes(), layout
    finally:
        path.unlink(missing_ok=True)


def parse_bytes(data: bytes | bytearray, sector_size: int | None = None) -> GptTable:
    blob = bytes(data)
    return parse_gpt(lambda off, n: blob[off : off + n], len(blob), sector_size, name="test.img")


SIZES = [512, pytest.param(4096, marks=needs_root)]


def header_at(data: bytearray, ss: int, lba: int) -> dict[str, int | bytes]:
    return dict(zip(_HDR_FIELDS, _HDR.unpack_from(data, lba * ss), strict=True))


def write_header(
    data: bytearray, ss: int, lba: int, fields: dict[str, int | bytes], *, fix_array: bool = True
) -> None:
    """Write header fields and re-compute the CRCs (the array's unless told), as a forger would."""
    h = dict(fields)
    count, esize, elba = int(h["entry_count"]), int(h["entry_size"]), int(h["entries_lba"])
    if fix_array and 0 < count * esize <= 1 << 20 and elba * ss + count * esize <= len(data):
        h["entries_crc"] = zlib.crc32(data[elba * ss : elba * ss + count * esize])
    h["header_crc"] = 0
    _HDR.pack_into(data, lba * ss, *(h[k] for k in _HDR_FIELDS))
    hsize = min(max(int(h["header_size"]), 92), ss)
    struct.pack_into("<I", data, lba * ss + 16, zlib.crc32(data[lba * ss : lba * ss + hsize]))


def test_base_images_match_sfdisk(tmp_path: Path) -> None:
    data, layout = base_image(512)
    (tmp_path / "a.img").write_bytes(data)
    table = read_gpt(tmp_path / "a.img")
    assert_matches_sfdisk(table, sfdisk_json(str(tmp_path / "a.img")))
    assert_matches_layout(table, layout)
    state = table.state_partitions()
    assert [p.index for p in state] == [2]
    assert state[0].grow_fs and not state[0].read_only and not state[0].no_auto
    assert table.partitions[-1].name == "последний" and table.partitions[-1].no_auto
    assert table.partitions[0].read_only and not table.partitions[0].is_state


def test_to_json() -> None:
    data, layout = base_image(512)
    js = json.loads(json.dumps(parse_bytes(data).to_json()))
    assert js["disk_guid"] == str(layout.disk_guid) and js["sector_size"] == 512
    assert js["used_backup"] is False and js["warning"] is None
    assert [p["index"] for p in js["partitions"]] == [1, 2, 128]
    state = js["partitions"][1]
    assert state["type_guid"] == "24436126-bb50-47e3-b47b-21dbd57591c7" and state["state"] is True
    assert state["part_guid"] == str(layout.parts[1].part_guid)
    assert state["attributes"] == GROW_FS and state["start"] == state["first_lba"] * 512


@pytest.mark.parametrize("ss", SIZES)
def test_sector_size_probe_and_forced(ss: int) -> None:
    data, layout = base_image(ss)
    assert_matches_layout(parse_bytes(data), layout)
    assert parse_bytes(data, ss).sector_size == ss
    other = 4096 if ss == 512 else 512
    with pytest.raises(GptError, match=rf"test.img: no valid GPT \({other}-byte sectors"):
        parse_bytes(data, other)


@needs_root
def test_block_device_reports_4096(tmp_path: Path) -> None:
    data, layout = base_image(4096)
    (tmp_path / "d.img").write_bytes(data)
    with loop_device(tmp_path / "d.img", 4096) as dev:
        table = read_gpt(dev)
        assert_matches_sfdisk(table, sfdisk_json(dev))
    assert_matches_layout(table, layout)


@pytest.mark.parametrize("table_length", [129, 256, 1000])
def test_many_entries(table_length: int) -> None:
    data, layout = base_image(512, table_length)
    table = parse_bytes(data)
    assert table.entry_count == table_length
    assert table.partitions[-1].index == table_length
    assert_matches_layout(table, layout)


# ---------------------------------------------------------------- damage and fallback


def _flip(data: bytearray, offset: int) -> None:
    data[offset] ^= 0xFF


def _primary_header(d: bytearray, ss: int, total: int) -> None:
    _flip(d, ss + 40)  # first usable LBA: covered by the header CRC


def _primary_entries(d: bytearray, ss: int, total: int) -> None:
    _flip(d, 2 * ss + 60)  # a byte of entry 1's name


def _backup_header(d: bytearray, ss: int, total: int) -> None:
    _flip(d, (total - 1) * ss + 30)


def _backup_entries(d: bytearray, ss: int, total: int) -> None:
    entries_lba = int(header_at(d, ss, total - 1)["entries_lba"])
    _flip(d, entries_lba * ss + 60)


def _zero_primary_sector(d: bytearray, ss: int, total: int) -> None:
    d[ss : 2 * ss] = bytes(ss)


Damage = Callable[[bytearray, int, int], None]

# (damages, "primary" | "backup" | None (error), fragment of the warning or error)
DAMAGE_CASES: list[tuple[list[Damage], str | None, str]] = [
    ([], "primary", ""),
    ([_primary_header], "backup", "primary GPT damaged (header at LBA 1: header CRC32 mismatch)"),
    ([_zero_primary_sector], "backup", "(header at LBA 1: no 'EFI PART' signature)"),
    ([_primary_entries], "backup", "primary GPT damaged (entry array at LBA 2: CRC32 mismatch)"),
    ([_backup_header], "primary", ""),
    ([_backup_entries], "primary", ""),
    ([_primary_header, _backup_header], None, "backup header at LBA"),
    ([_primary_entries, _backup_entries], None, "backup entry array at LBA"),
    ([_primary_header, _backup_entries], None, "header CRC32 mismatch"),
]


@pytest.mark.parametrize("ss", SIZES)
@pytest.mark.parametrize(("damages", "used", "message"), DAMAGE_CASES)
def test_damage(
    tmp_path: Path, ss: int, damages: list[Damage], used: str | None, message: str
) -> None:
    data, layout = base_image(ss)
    d = bytearray(data)
    for damage in damages:
        damage(d, ss, layout.total_lbas)
    path = tmp_path / "damaged.img"
    path.write_bytes(d)
    if used is None:
        with pytest.raises(GptError) as exc:
            read_gpt(path)
        assert str(exc.value).startswith(f"{path}: no valid GPT ({ss}-byte sectors: primary ")
        assert message in str(exc.value)
        return
    table = read_gpt(path)
    assert_matches_layout(table, layout)
    assert table.used_backup == (used == "backup")
    assert message in (table.warning or ""), table.warning
    assert (table.warning is None) == (used == "primary")
    if ss == 512:  # libfdisk falls back to the backup as well
        assert_matches_sfdisk(table, sfdisk_json(str(path)))


def test_backup_found_through_alternate_lba_of_grown_image(tmp_path: Path) -> None:
    # An image grown after partitioning keeps its backup at the old end: the last
    # LBA holds nothing, the primary's AlternateLBA still points at the backup.
    data, layout = base_image(512)
    d = bytearray(data) + bytes(1 << 20)
    _primary_entries(d, 512, layout.total_lbas)
    table = parse_bytes(d)
    assert table.used_backup
    assert f"using the backup at LBA {layout.total_lbas - 1}" in (table.warning or "")
    assert_matches_layout(table, layout)


def test_truncated_backup_warns() -> None:
    data, layout = base_image(512)
    table = parse_bytes(data[:-512])
    assert not table.used_backup
    assert "lies beyond the end of the disk" in (table.warning or "")
    assert_matches_layout(table, layout)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (0, "no GPT found"),
        (1, "no GPT found"),
        (511, "no GPT found"),
        (512, "no GPT found"),
        (600, "600 bytes is too small for a GPT with 512-byte sectors"),
        (1024, "1024 bytes is too small for a GPT"),
        (2048, "usable LBAs 34..132 invalid for 4 sectors; backup header at LBA 3: no 'EFI"),
        (17 * 1024, "primary header at LBA 1: usable LBAs 34..132 invalid for 34 sectors"),
        (-34 * 512, "usable LBAs 34..132 invalid for 132 sectors"),
    ],
)
def test_truncated(keep: int, message: str) -> None:
    data, _ = base_image(512)
    with pytest.raises(GptError, match="^test.img: ") as exc:
        parse_bytes(data[:keep])
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda m: m.__setitem__(slice(510, 512), b"\0\0"), "boot signature 55 AA missing"),
        (lambda m: m.__setitem__(446 + 4, 0x83), "no partition of type 0xEE"),
        (lambda m: m.__setitem__(slice(0, 512), bytes(512)), "no protective MBR"),
    ],
)
def test_protective_mbr_missing(patch: Callable[[bytearray], None], message: str) -> None:
    data, _ = base_image(512)
    d = bytearray(data)
    patch(d)
    with pytest.raises(GptError, match=message):
        parse_bytes(d)


def test_hybrid_mbr_accepted() -> None:
    data, layout = base_image(512)
    d = bytearray(data)
    d[446 + 16 : 446 + 32] = d[446 : 446 + 16]  # 0xEE moves to slot 2
    d[446 : 446 + 16] = bytes([0x80, 0, 0, 0, 0x0C]) + bytes(11)  # FAT32 LBA in slot 1
    assert_matches_layout(parse_bytes(d), layout)


# ---------------------------------------------------------------- forged headers and entries

HeaderPatch = Callable[[dict[str, int | bytes], int], dict[str, int | bytes]]

# Each forged with valid CRCs, so only the check behind the CRC can catch it.
HEADER_CASES: list[tuple[str, HeaderPatch, str]] = [
    ("signature", lambda h, t: {"signature": b"EFI PARX"}, "'EFI PART'"),
    ("revision", lambda h, t: {"revision": 0x20000}, "unsupported revision 0x00020000"),
    ("hsize-small", lambda h, t: {"header_size": 91}, "header size 91 not within 92..512"),
    ("hsize-big", lambda h, t: {"header_size": 513}, "header size 513 not within 92..512"),
    ("my-lba", lambda h, t: {"my_lba": int(h["my_lba"]) + 1}, "says it is at LBA"),
    ("alt-self", lambda h, t: {"alternate_lba": h["my_lba"]}, "alternate LBA"),
    ("alt-zero", lambda h, t: {"alternate_lba": 0}, "alternate LBA 0 invalid"),
    ("esize-0", lambda h, t: {"entry_size": 0}, "entry size 0 not a multiple"),
    ("esize-129", lambda h, t: {"entry_size": 129}, "entry size 129 not a multiple"),
    ("esize-big", lambda h, t: {"entry_size": 8192}, "entry size 8192 not a multiple"),
    ("count-0", lambda h, t: {"entry_count": 0}, "0 entries of 128 bytes out of bounds"),
    ("count-huge", lambda h, t: {"entry_count": 0xFFFFFFFF}, "entries of 128 bytes out of"),
    (
        "usable-inverted",
        lambda h, t: {"first_usable": h["last_usable"], "last_usable": h["first_usable"]},
        "usable LBAs",
    ),
    ("usable-past-end", lambda h, t: {"last_usable": t}, "usable LBAs"),
    ("usable-from-0", lambda h, t: {"first_usable": 0}, "usable LBAs 0.."),
    ("array-past-end", lambda h, t: {"entries_lba": t - 1}, "outside the disk"),
    ("array-at-0", lambda h, t: {"entries_lba": 0}, "outside the disk"),
    ("array-in-usable", lambda h, t: {"entries_lba": h["first_usable"]}, "overlaps the usable"),
    ("array-crc", lambda h, t: {"entries_crc": 1}, "CRC32 mismatch"),
]


def _forge(d: bytearray, ss: int, lba: int, total: int, patch: HeaderPatch) -> None:
    h = header_at(d, ss, lba)
    changes = patch(h, total)
    h.update(changes)
    write_header(d, ss, lba, h, fix_array="entries_crc" not in changes)


@pytest.mark.parametrize(
    ("case", "patch", "message"), HEADER_CASES, ids=[c[0] for c in HEADER_CASES]
)
def test_forged_header(case: str, patch: HeaderPatch, message: str) -> None:
    data, layout = base_image(512)
    total = layout.total_lbas
    # Only the primary forged: the backup takes over, and the warning says why.
    d = bytearray(data)
    _forge(d, 512, 1, total, patch)
    table = parse_bytes(d)
    assert table.used_backup and message in (table.warning or ""), table.warning
    assert_matches_layout(table, layout)
    # Both forged: an error carrying the reason.
    _forge(d, 512, total - 1, total, patch)
    with pytest.raises(GptError, match="^test.img: no (valid )?GPT") as exc:
        parse_bytes(d)
    assert message in str(exc.value)


def test_backup_array_over_its_header() -> None:
    data, layout = base_image(512)
    total = layout.total_lbas
    d = bytearray(data)
    _primary_header(d, 512, total)
    _forge(d, 512, total - 1, total, lambda h, t: {"entries_lba": t - 32})
    with pytest.raises(GptError, match="backup header at LBA 165: entry array overlaps the header"):
        parse_bytes(d)


EntryPatch = Callable[[bytearray, dict[str, int | bytes]], None]


def _set_entry(d: bytearray, h: dict[str, int | bytes], slot: int, **fields: int | bytes) -> None:
    off = int(h["entries_lba"]) * 512 + (slot - 1) * int(h["entry_size"])
    layout = {"first": (32, "<Q"), "last": (40, "<Q"), "name": (56, "72s"), "type": (0, "16s")}
    for key, value in fields.items():
        pos, fmt = layout[key]
        struct.pack_into(fmt, d, off + pos, value)


def _patch_entries(
    data: bytes, patch: Callable[[bytearray, dict[str, int | bytes]], None]
) -> bytes:
    d = bytearray(data)
    total = len(d) // 512
    for lba in (1, total - 1):
        h = header_at(d, 512, lba)
        patch(d, h)
        write_header(d, 512, lba, h)
    return bytes(d)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda d, h: _set_entry(d, h, 1, first=200, last=199), "partition 1 ends (LBA 199)"),
        (lambda d, h: _set_entry(d, h, 1, first=1), "partition 1 spans LBA 1..43, outside"),
        (lambda d, h: _set_entry(d, h, 128, last=int(h["last_usable"]) + 1), "partition 128 "),
        (lambda d, h: _set_entry(d, h, 5, first=40, last=40, type=LINUX.bytes_le), "overlap"),
    ],
)
def test_forged_entries(patch: EntryPatch, message: str) -> None:
    data, _ = base_image(512)
    with pytest.raises(GptError, match=re.escape(message)):
        parse_bytes(_patch_entries(data, patch))


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("a😀b".encode("utf-16-le"), "a😀b"),  # surrogate pair: sfdisk cannot write these
        (b"\x00\xd8x\x00", "\ufffdx"),  # lone high surrogate: replaced, not fatal
        ("x".encode("utf-16-le") * 36, "x" * 36),  # full 36 units, no NUL
        (b"a\x00\x00\x00b\x00", "a"),  # up to the first NUL only
        (b"", ""),
    ],
)
def test_names(raw: bytes, name: str) -> None:
    data, _ = base_image(512)
    patched = _patch_entries(data, lambda d, h: _set_entry(d, h, 1, name=raw))
    assert parse_bytes(patched).partitions[0].name == name


# ---------------------------------------------------------------- hostile input never escapes


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "not a disk image or block device"),
        (lambda p: p.write_bytes(b""), "no GPT found"),
        (lambda p: p.write_bytes(os.urandom(1 << 16)), "no GPT found"),
        (lambda p: None, "cannot open: No such file or directory"),
        (lambda p: p.symlink_to("/dev/null"), "not a disk image or block device"),
    ],
)
def test_bad_files(tmp_path: Path, make: Callable[[Path], None], message: str) -> None:
    path = tmp_path / "x.img"
    make(path)
    with pytest.raises(GptError) as exc:
        read_gpt(path)
    assert str(exc.value) == f"{path}: {message}" or str(exc.value).startswith(f"{path}: ")
    assert message in str(exc.value)
    assert isinstance(exc.value, PystateError)


def _interesting_offsets(size: int, ss: int) -> st.SearchStrategy[int]:
    # Headers, MBR and the first entries hold everything the parser looks at.
    return st.one_of(
        st.integers(0, 512 + 3 * ss),
        st.integers(ss, ss + 92),
        st.integers(size - ss, size - ss + 92),
        st.integers(0, size - 1),
    )


@settings(max_examples=1000, deadline=None)
@given(data=st.data(), ss=st.sampled_from([512, 4096]), fix_crcs=st.booleans())
def test_fuzz_mutated_images(data: st.DataObject, ss: int, fix_crcs: bool) -> None:
    if ss == 4096 and os.geteuid() != 0:
        ss = 512
    raw, layout = base_image(ss)
    d = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        offset = data.draw(_interesting_offsets(len(d), ss))
        d[offset] = data.draw(st.integers(0, 255))
    if fix_crcs:
        for lba in (1, layout.total_lbas - 1):
            write_header(d, ss, lba, header_at(d, ss, lba))
    cut = data.draw(
        st.sampled_from([len(d), len(d), len(d) - ss, data.draw(st.integers(0, len(d)))])
    )
    forced = data.draw(st.sampled_from([None, None, 512, 4096]))
    try:
        table = parse_bytes(d[:cut], forced)
    except GptError as exc:
        assert str(exc).startswith("test.img: ")
        return
    for p in table.partitions:
        assert table.first_usable_lba <= p.first_lba <= p.last_lba <= table.last_usable_lba
        assert p.start + p.size <= len(d[:cut])


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=12_000), forced=st.sampled_from([None, 512, 4096, 1024]))
def test_fuzz_garbage(blob: bytes, forced: int | None) -> None:
    # Garbage with a protective MBR and a signature, so parsing goes further than the first check.
    d = bytearray(blob) + bytes(max(0, 1100 - len(blob)))
    d[446 + 4], d[510], d[511] = 0xEE, 0x55, 0xAA
    d[512:520] = b"EFI PART"
    with pytest.raises(GptError, match="^test.img: "):
        parse_bytes(d, forced)


# ---------------------------------------------------------------- free extents (pure; sfdisk -F)


def _table(ss: int, first: int, last: int, spans: list[tuple[int, int]]) -> GptTable:
    parts = tuple(
        Partition(i + 1, LINUX, uuid.UUID(int=i + 1), "", a, b, 0, a * ss, (b - a + 1) * ss)
        for i, (a, b) in enumerate(spans)
    )
    return GptTable(ss, uuid.UUID(int=0), parts, (last + 34) * ss, first, last, 128, 128)


@pytest.mark.parametrize(
    ("first", "last", "spans", "expected"),
    [
        (34, 99, [], [(34, 99)]),
        (34, 99, [(34, 99)], []),
        (34, 99, [(40, 49)], [(34, 39), (50, 99)]),
        (34, 99, [(60, 99), (34, 39)], [(40, 59)]),  # entry order is not disk order
        (34, 99, [(34, 34), (36, 36), (99, 99)], [(35, 35), (37, 98)]),
        (2048, 2048, [], [(2048, 2048)]),
    ],
)
def test_free_extents_table(
    first: int, last: int, spans: list[tuple[int, int]], expected: list[tuple[int, int]]
) -> None:
    table = _table(512, first, last, spans)
    got = free_extents(table)
    assert [(e.first_lba, e.last_lba) for e in got] == expected
    assert all(e.start == e.first_lba * 512 and e.size == (e.last_lba - e.first_lba + 1) * 512
               for e in got)  # fmt: skip
    biggest = largest_free_extent(table)
    assert biggest == (max(got, key=lambda e: e.size) if got else None)


@st.composite
def usable_layouts(draw: st.DrawFn) -> GptTable:
    ss = draw(st.sampled_from([512, 4096]))
    first = draw(st.integers(2, 2048))
    last = first + draw(st.integers(0, 10_000))
    cuts = sorted(draw(st.lists(st.integers(first, last), max_size=16, unique=True)))
    # Pairs of cut points become partitions, so touching, gapped and full layouts all occur.
    spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    if draw(st.booleans()):
        spans = [(a, b) for a, b in spans if draw(st.booleans())]
    return _table(ss, first, last, draw(st.permutations(spans)))


@settings(max_examples=500, deadline=None)
@given(table=usable_layouts())
def test_free_extents_tile_the_usable_area(table: GptTable) -> None:
    """Partitions and extents cover first..last usable exactly once; extents are maximal."""
    extents = free_extents(table)
    owner: dict[int, str] = {}
    for p in table.partitions:
        for lba in range(p.first_lba, p.last_lba + 1):
            owner[lba] = "part"
    for e in extents:
        assert e.first_lba <= e.last_lba
        for lba in range(e.first_lba, e.last_lba + 1):
            assert lba not in owner
            owner[lba] = "free"
    assert sorted(owner) == list(range(table.first_usable_lba, table.last_usable_lba + 1))
    assert list(extents) == sorted(extents, key=lambda e: e.first_lba)
    for a, b in itertools.pairwise(extents):
        assert b.first_lba > a.last_lba + 1  # a partition lies between: never two adjacent
    ss = table.sector_size
    total = (table.last_usable_lba - table.first_usable_lba + 1) * ss
    assert sum(e.size for e in extents) == total - sum(p.size for p in table.partitions)
    biggest = largest_free_extent(table)
    assert (biggest.size if biggest else 0) == max((e.size for e in extents), default=0)


_SFDISK_FREE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s", re.MULTILINE)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_free_extents_against_sfdisk(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """sfdisk -F lists the free runs aligned to its 1 MiB grain: each lies inside one of ours,
    and each of ours of at least two grains holds one (alignment loses less than a grain)."""
    grain = 2048
    total = data.draw(st.integers(8, 200)) * grain + data.draw(st.integers(0, grain - 1))
    parts: list[PartSpec] = []
    pos = grain
    for slot in range(1, data.draw(st.integers(0, 6)) + 1):
        start = pos + data.draw(st.sampled_from([0, 0, 1, 7, grain - 1, grain, 3 * grain + 5]))
        size = data.draw(st.integers(1, 8 * grain))
        if start + size - 1 > total - 34:
            break
        parts.append(PartSpec(slot, start, size, LINUX, uuid.uuid4(), f"p{slot}", 0))
        pos = start + size
    layout = Layout(512, total, 128, grain, uuid.uuid4(), tuple(parts))
    image = tmp_path_factory.getbasetemp() / "free.img"
    make_image(image, layout)
    ours = free_extents(read_gpt(image))
    theirs = [
        (int(a), int(b)) for a, b, _ in _SFDISK_FREE.findall(_sh(["sfdisk", "-F", str(image)]))
    ]
    for a, b in theirs:
        assert any(e.first_lba <= a <= b <= e.last_lba for e in ours), (theirs, ours)
    for e in ours:
        if e.last_lba - e.first_lba + 1 >= 2 * grain:
            assert any(e.first_lba <= a <= b <= e.last_lba for a, b in theirs), (theirs, ours)
    biggest = largest_free_extent(read_gpt(image))
    assert (biggest.size // 512 if biggest else 0) >= max((b - a + 1 for a, b in theirs), default=0)


def _failing(data: bytes, bad: range) -> Callable[[int, int], bytes]:
    """read_at over data whose bytes in ``bad`` fail with EIO (a disk's unreadable block)."""

    def read_at(offset: int, length: int) -> bytes:
        if offset < bad.stop and offset + length > bad.start:
            raise OSError(5, "Input/output error")
        return bytes(data[offset : offset + length])

    return read_at


@pytest.mark.parametrize("ss", SIZES)
def test_unreadable_first_block_uses_the_backup(ss: int) -> None:
    # Issue 14 fault torture (disk gpt-read): an I/O error on the disk's first 4 KiB
    # (protective MBR and primary header) made the disk "cannot read the partition table"
    # although a valid backup GPT was readable at its end.
    data, layout = base_image(ss)
    table = parse_gpt(_failing(data, range(0, 4096)), len(data), ss)
    assert table.used_backup
    assert "primary GPT damaged (unreadable (Input/output error))" in (table.warning or "")
    assert_matches_layout(table, layout)


def test_unreadable_primary_and_backup_is_no_valid_gpt() -> None:
    data, _ = base_image(512)
    primary, last = _failing(data, range(512, 1024)), len(data) - 512

    def read_at(offset: int, length: int) -> bytes:
        if offset <= last < offset + length:
            raise OSError(5, "Input/output error")
        return primary(offset, length)

    with pytest.raises(GptError, match=r"primary unreadable .*backup at LBA \d+ unreadable"):
        parse_gpt(read_at, len(data), 512)
