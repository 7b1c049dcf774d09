"""The LUKS2 header, parsed and checked without cryptsetup (pure).

Both copies of the header (binary part, JSON area, SHA-256 checksums), the newer valid
one chosen; keyslots and tokens from its JSON metadata. system/luks.py reads the bytes;
the unlock path needs no process for any lookup (SPEC §10). docs/luks.md has the layout.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from pystate_initrd.errors import PystateError

MAX_KEYSLOTS = 32  # LUKS2 keyslot and token ids are 0..31


class LuksError(PystateError):
    """A LUKS2 operation on encrypted.img failed."""


class NotLuks(LuksError):
    """Not a LUKS2 image, or both copies of its header are damaged."""


_MAGIC_PRIMARY = b"LUKS\xba\xbe"
_MAGIC_SECONDARY = b"SKUL\xba\xbe"
_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")  # struct luks2_hdr_disk, 512 bytes
BINARY_SIZE = 4096  # the binary header with its padding; the JSON area follows
_CSUM_OFFSET = 448
_CSUM_SIZE = 64
# Allowed sizes of one header copy (binary header + JSON area): 16 KiB .. 4 MiB.
HEADER_SIZES = tuple(16384 << i for i in range(9))
_JSON_SECTIONS = ("keyslots", "tokens", "segments", "digests", "config")


@dataclass(frozen=True)
class Luks2Header:
    """One valid copy of a LUKS2 header (the newer if both are valid)."""

    uuid: str
    label: str
    subsystem: str
    seqid: int
    header_size: int  # bytes per copy, binary header and JSON area
    metadata: dict[str, Any]  # the JSON area: keyslots, tokens, segments, digests, config
    primary_ok: bool
    secondary_ok: bool

    @property
    def data_offset(self) -> int:
        return _int(self.metadata["segments"].get("0", {}).get("offset", 0), "segment offset")


@dataclass(frozen=True)
class KeyslotInfo:
    slot: int
    type: str  # "luks2"
    key_bits: int  # volume key size
    cipher: str  # keyslot area encryption
    pbkdf: str  # "pbkdf2", "argon2id", "argon2i"
    hash: str | None  # pbkdf2 only
    iterations: int | None  # pbkdf2 only
    time: int | None  # argon2 only
    memory_kib: int | None  # argon2 only
    parallel: int | None  # argon2 only
    priority: int  # 0 ignore, 1 normal, 2 prefer
    salt: str | None = None  # kdf.salt, base64: which keyslot this is (a new one has another)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("ascii", errors="replace")


def _int(value: object, what: str) -> int:
    """LUKS2 JSON numbers: JSON ints, or decimal strings for 64-bit values."""
    if isinstance(value, bool):
        raise NotLuks(f"LUKS2 header: {what} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    raise NotLuks(f"LUKS2 header: {what} is not a number")


def _copy_at(data: bytes, offset: int, magic: bytes) -> tuple[int, int, dict[str, Any]] | None:
    """(seqid, hdr_size, JSON) of the header copy at offset, or None when it is not valid."""
    if len(data) < offset + BINARY_SIZE:
        return None
    fields = _BINARY.unpack_from(data, offset)
    got_magic, version, hdr_size, seqid = fields[0:4]
    csum_alg, hdr_offset, csum = _text(fields[5]), fields[9], fields[11]
    if got_magic != magic or version != 2 or hdr_size not in HEADER_SIZES:
        return None
    if hdr_offset != offset or len(data) < offset + hdr_size:
        return None
    if csum_alg not in ("sha1", "sha256", "sha512"):
        return None
    digest = hashlib.new(csum_alg)
    digest.update(data[offset : offset + _CSUM_OFFSET])
    digest.update(bytes(_CSUM_SIZE))
    digest.update(data[offset + _CSUM_OFFSET + _CSUM_SIZE : offset + hdr_size])
    if digest.digest() != csum[: digest.digest_size]:
        return None
    area = data[offset + BINARY_SIZE : offset + hdr_size].split(b"\0", 1)[0]
    try:
        metadata = json.loads(area.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(metadata, dict) or not all(
        isinstance(metadata.get(k), dict) for k in _JSON_SECTIONS
    ):
        return None
    return seqid, hdr_size, metadata


def has_luks_magic(data: bytes) -> bool:
    """Whether data starts like a LUKS header (LUKS1 or LUKS2), or holds a LUKS2 secondary
    header's magic at one of the offsets it can have: a header, even a damaged one."""
    if data[:6] == _MAGIC_PRIMARY:
        return True
    return any(data[o : o + 6] == _MAGIC_SECONDARY for o in HEADER_SIZES)


def parse_luks2_header(data: bytes, name: str = "image") -> Luks2Header:
    """The LUKS2 header at the start of data (pure).

    Both copies are checked (magic, version, size, offset, checksum, a JSON
    object with the five sections); the newer valid one is returned, as
    cryptsetup does. data should hold both copies: twice the header size, normally
    32 KiB (the secondary of a damaged primary is looked for at every allowed
    size, up to 4 MiB + 4 KiB).
    """
    primary = _copy_at(data, 0, _MAGIC_PRIMARY)
    secondary = None
    candidates = (primary[1],) if primary else HEADER_SIZES
    for offset in candidates:
        secondary = _copy_at(data, offset, _MAGIC_SECONDARY)
        if secondary:
            break
    if primary is None and secondary is None:
        if data[:6] == _MAGIC_PRIMARY and data[6:8] == b"\0\1":
            raise NotLuks(f"{name} is a LUKS1 image, not LUKS2")
        if not has_luks_magic(data):
            raise NotLuks(f"{name} is not a LUKS2 image (no LUKS2 header)")
        raise NotLuks(
            f"{name}: both copies of the LUKS2 header are damaged",
            hint="nothing was changed; restore the header from a backup",
        )
    if primary and (secondary is None or primary[0] >= secondary[0]):
        chosen, offset = primary, 0
    else:
        assert secondary is not None
        chosen, offset = secondary, secondary[1]
    fields = _BINARY.unpack_from(data, offset)
    return Luks2Header(
        uuid=_text(fields[7]),
        label=_text(fields[4]),
        subsystem=_text(fields[8]),
        seqid=chosen[0],
        header_size=chosen[1],
        metadata=chosen[2],
        primary_ok=primary is not None,
        secondary_ok=secondary is not None,
    )


def keyslot_infos(metadata: dict[str, Any]) -> dict[int, KeyslotInfo]:
    """Keyslots from the LUKS2 JSON metadata (pure)."""
    result = {}
    for key, slot in metadata["keyslots"].items():
        number = _id(key, "keyslot")
        if not isinstance(slot, dict) or not isinstance(slot.get("kdf"), dict):
            raise NotLuks(f"LUKS2 header: keyslot {key} is malformed")
        kdf, area = slot["kdf"], slot.get("area", {})
        pbkdf = str(kdf.get("type"))
        optional = {
            k: _int(kdf[k], f"keyslot {key} {k}") if k in kdf else None
            for k in ("iterations", "time", "memory", "cpus")
        }
        result[number] = KeyslotInfo(
            slot=number,
            type=str(slot.get("type")),
            key_bits=8 * _int(slot.get("key_size"), f"keyslot {key} key_size"),
            cipher=str(area.get("encryption")) if isinstance(area, dict) else "",
            pbkdf=pbkdf,
            hash=str(kdf["hash"]) if "hash" in kdf else None,
            iterations=optional["iterations"],
            time=optional["time"],
            memory_kib=optional["memory"],
            parallel=optional["cpus"],
            priority=_int(slot.get("priority", 1), f"keyslot {key} priority"),
            salt=kdf["salt"] if isinstance(kdf.get("salt"), str) else None,
        )
    return dict(sorted(result.items()))


def token_dicts(metadata: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Tokens from the LUKS2 JSON metadata (pure). Their content is untrusted input."""
    result = {}
    for key, token in metadata["tokens"].items():
        if not isinstance(token, dict):
            raise NotLuks(f"LUKS2 header: token {key} is not an object")
        result[_id(key, "token")] = token
    return dict(sorted(result.items()))


def _id(key: object, what: str) -> int:
    if isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < MAX_KEYSLOTS:
        return int(key)
    raise NotLuks(f"LUKS2 header: {what} id {key!r} is invalid")
