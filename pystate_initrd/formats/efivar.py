"""EFI variables as efivarfs shows them (pure): file names, attributes, UTF-16 strings.

A variable is the file ``<Name>-<vendor guid>`` in /sys/firmware/efi/efivars; its bytes are
the variable's 32-bit attributes (little-endian) followed by its data, and a write must hand
over both in one go (Documentation/filesystems/efivarfs.rst). The strings of systemd's Boot
Loader Interface are UTF-16LE with a NUL terminator (``LoaderEntryOneShot``,
``LoaderEntrySelected``); ``LoaderEntries`` is a series of such strings, each NUL-terminated
(systemd's docs/BOOT_LOADER_INTERFACE.md). pystate's own request variable uses the same form.

Every decoder refuses what it does not understand with ``EfiVarError`` naming the variable;
every encoder is the exact inverse of its decoder. system/efivars.py reads and writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass

from pystate_initrd.errors import PystateError

# systemd's Boot Loader Interface (systemd-boot sets and reads these).
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# pystate's own vendor GUID: the namespace of the variables pystate itself defines.
PYSTATE_GUID = "8d901e04-0f5c-45b8-9bac-ca374402d770"

# UEFI 2.x, 8.2 "Variable Services": the attribute bits.
NON_VOLATILE = 0x1
BOOTSERVICE_ACCESS = 0x2
RUNTIME_ACCESS = 0x4
# What bootctl and systemd write (efi_set_variable()), and what pystate writes.
DEFAULT_ATTRIBUTES = NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS

ATTRIBUTES_SIZE = 4
# systemd's efi_get_variable() refuses anything larger; no variable pystate reads comes close.
MAX_VARIABLE_SIZE = 4 * 1024 * 1024 + ATTRIBUTES_SIZE
MAX_NAME_CHARS = 1024  # efivarfs: EFI_VAR_NAME_LEN

_HEX = frozenset("0123456789abcdef")


class EfiVarError(PystateError):
    """An EFI variable's name or content is not what it should be."""


# --- names ------------------------------------------------------------------------------------


def _is_guid(text: str) -> bool:
    groups = text.split("-")
    lengths = [len(g) for g in groups]
    return lengths == [8, 4, 4, 4, 12] and all(c in _HEX for g in groups for c in g)


def file_name(name: str, guid: str) -> str:
    """efivarfs's file name for a variable: ``Name-guid`` (the GUID in lowercase)."""
    if not name or len(name) > MAX_NAME_CHARS or any(c in "/\0" for c in name):
        raise EfiVarError(f"{name!r} is not an EFI variable name (empty, too long, '/' or NUL)")
    if not _is_guid(guid.lower()):
        raise EfiVarError(f"{guid!r} is not a GUID (8-4-4-4-12 hex digits)")
    return f"{name}-{guid.lower()}"


def split_file_name(file: str) -> tuple[str, str]:
    """(name, guid) of an efivarfs file name; the inverse of file_name()."""
    name, dash, guid = file[:-37], file[-37:-36], file[-36:]
    if dash != "-" or not _is_guid(guid) or not name:
        raise EfiVarError(f"{file!r} is not an efivarfs file name (Name-guid, lowercase GUID)")
    file_name(name, guid)  # the same checks as the other way round
    return name, guid


# The variables pystate reads or writes, as efivarfs names them.
LOADER_DEVICE_PART_UUID = file_name("LoaderDevicePartUUID", LOADER_GUID)
LOADER_ENTRIES = file_name("LoaderEntries", LOADER_GUID)
LOADER_ENTRY_ONESHOT = file_name("LoaderEntryOneShot", LOADER_GUID)
LOADER_ENTRY_SELECTED = file_name("LoaderEntrySelected", LOADER_GUID)
# The factory-reset request (docs/factory-reset.md): the reset entry's id, written by
# `pystate factory-reset` in the booted system, read and deleted by the initrd.
FACTORY_RESET_REQUEST = file_name("PystateFactoryReset", PYSTATE_GUID)


# --- the file: attributes + data -----------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    attributes: int
    data: bytes


def parse_variable(raw: bytes, what: str = "EFI variable") -> Variable:
    """A variable from its efivarfs file's bytes: 4 bytes of attributes, then the data."""
    if len(raw) < ATTRIBUTES_SIZE:
        raise EfiVarError(f"{what}: {len(raw)} bytes, shorter than its 4 bytes of attributes")
    if len(raw) > MAX_VARIABLE_SIZE:
        raise EfiVarError(f"{what}: {len(raw)} bytes, larger than {MAX_VARIABLE_SIZE}")
    return Variable(int.from_bytes(raw[:ATTRIBUTES_SIZE], "little"), bytes(raw[ATTRIBUTES_SIZE:]))


def format_variable(variable: Variable) -> bytes:
    """The bytes to write to efivarfs, in one write(); the inverse of parse_variable()."""
    if not 0 <= variable.attributes <= 0xFFFFFFFF:
        raise EfiVarError(f"attributes {variable.attributes:#x} do not fit 32 bits")
    if len(variable.data) + ATTRIBUTES_SIZE > MAX_VARIABLE_SIZE:
        raise EfiVarError(f"{len(variable.data)} bytes of data: too large for an EFI variable")
    return variable.attributes.to_bytes(ATTRIBUTES_SIZE, "little") + variable.data


# --- strings: UTF-16LE, NUL-terminated ------------------------------------------------------


def _decode_utf16(data: bytes, what: str) -> str:
    if len(data) % 2:
        raise EfiVarError(f"{what}: {len(data)} bytes, an odd length for UTF-16")
    try:
        return data.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise EfiVarError(f"{what}: not UTF-16LE (byte {exc.start}: {exc.reason})") from None


def _encode_utf16(text: str, what: str) -> bytes:
    if "\0" in text:
        raise EfiVarError(f"{what}: {text!r} holds a NUL character")
    try:
        return text.encode("utf-16-le")
    except UnicodeEncodeError as exc:
        raise EfiVarError(f"{what}: {text!r} cannot be UTF-16 ({exc.reason})") from None


def decode_string(data: bytes, what: str = "EFI variable") -> str:
    """A UTF-16LE string with its NUL terminator, the NUL the last character, as the Boot
    Loader Interface writes them."""
    text = _decode_utf16(data, what)
    if not text.endswith("\0"):
        raise EfiVarError(f"{what}: the UTF-16 string has no NUL terminator")
    if "\0" in text[:-1]:
        raise EfiVarError(f"{what}: a NUL inside the UTF-16 string")
    return text[:-1]


def encode_string(text: str, what: str = "EFI variable") -> bytes:
    """The inverse of decode_string(): UTF-16LE plus a NUL terminator."""
    return _encode_utf16(text, what) + b"\0\0"


def decode_list(data: bytes, what: str = "EFI variable") -> list[str]:
    """A series of UTF-16LE strings, each NUL-terminated (``LoaderEntries``); none may be
    empty. No bytes at all is the empty list."""
    text = _decode_utf16(data, what)
    if not text:
        return []
    if not text.endswith("\0"):
        raise EfiVarError(f"{what}: the last UTF-16 string has no NUL terminator")
    items = text[:-1].split("\0")
    if "" in items:
        raise EfiVarError(f"{what}: an empty string in the list")
    return items


def encode_list(items: list[str], what: str = "EFI variable") -> bytes:
    """The inverse of decode_list()."""
    if "" in items:
        raise EfiVarError(f"{what}: an empty string cannot be in the list")
    return b"".join(encode_string(item, what) for item in items)
