"""EFI variables: the efivarfs file format (pure, formats/efivar.py) and the I/O
(system/efivars.py).

This host has no efivarfs (and a test must not write the firmware's variables anyway), so
the I/O runs on a temporary directory standing in for /sys/firmware/efi/efivars: the same
file names and bytes. What only efivarfs does (one write per variable, immutable files)
is imitated where it can be: the immutable flag with chattr +i on the test's ext4.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root
from hypothesis import given
from hypothesis import strategies as st

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import efivar
from pystate_initrd.formats.efivar import EfiVarError
from pystate_initrd.system import efivars
from pystate_initrd.system.efivars import EfiVarsError

ID = "pystate-factory-reset.efi"
U16 = "utf-16-le"

# Text that can be a string variable: no NUL (hypothesis's text() has no lone surrogates).
chars = st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))
texts = st.text(chars, max_size=40)
items = st.lists(st.text(chars, min_size=1, max_size=20))


# --- names -------------------------------------------------------------------------------------


def test_the_variable_names() -> None:
    assert efivar.FACTORY_RESET_REQUEST == (
        "PystateFactoryReset-8d901e04-0f5c-45b8-9bac-ca374402d770"
    )
    assert efivar.LOADER_ENTRY_ONESHOT == "LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
    assert efivar.LOADER_ENTRIES == "LoaderEntries-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
    assert efivar.LOADER_ENTRY_SELECTED == (
        "LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
    )
    assert efivar.DEFAULT_ATTRIBUTES == 0x7


@pytest.mark.parametrize(
    ("name", "guid", "expected"),
    [
        ("LoaderEntries", efivar.LOADER_GUID, f"LoaderEntries-{efivar.LOADER_GUID}"),
        ("X", efivar.PYSTATE_GUID.upper(), f"X-{efivar.PYSTATE_GUID}"),  # lowercased
        ("", efivar.LOADER_GUID, "not an EFI variable name"),
        ("a/b", efivar.LOADER_GUID, "not an EFI variable name"),
        ("a\0b", efivar.LOADER_GUID, "not an EFI variable name"),
        ("X", "4a67b082-0a4c-41cf-b6c7", "not a GUID"),
        ("X", "4a67b082-0a4c-41cf-b6c7-440b29bb8c4g", "not a GUID"),
    ],
)
def test_file_name(name: str, guid: str, expected: str) -> None:
    if expected.startswith("not "):
        with pytest.raises(EfiVarError, match=expected):
            efivar.file_name(name, guid)
    else:
        assert efivar.file_name(name, guid) == expected
        assert efivar.split_file_name(expected) == (name, guid.lower())


@pytest.mark.parametrize(
    "file",
    ["LoaderEntries", f"-{efivar.LOADER_GUID}", f"X_{efivar.LOADER_GUID}", "X-" + "0" * 36],
)
def test_split_file_name_refuses(file: str) -> None:
    with pytest.raises(EfiVarError, match="not an efivarfs file name"):
        efivar.split_file_name(file)


@given(
    st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1),
    st.uuids(),
)
def test_file_name_round_trip(name: str, guid: Any) -> None:
    assert efivar.split_file_name(efivar.file_name(name, str(guid))) == (name, str(guid))


# --- attributes + data -------------------------------------------------------------------------


@given(st.integers(0, 0xFFFFFFFF), st.binary(max_size=200))
def test_variable_round_trip(attributes: int, data: bytes) -> None:
    raw = efivar.format_variable(efivar.Variable(attributes, data))
    assert raw[:4] == attributes.to_bytes(4, "little")
    assert efivar.parse_variable(raw) == efivar.Variable(attributes, data)


@pytest.mark.parametrize("raw", [b"", b"\x07", b"\x07\0\0"])
def test_variable_without_its_attributes_is_refused(raw: bytes) -> None:
    with pytest.raises(EfiVarError, match=r"X: \d bytes, shorter than its 4 bytes of attributes"):
        efivar.parse_variable(raw, "X")


def test_variable_too_large() -> None:
    with pytest.raises(EfiVarError, match="larger than"):
        efivar.parse_variable(bytes(efivar.MAX_VARIABLE_SIZE + 1))
    with pytest.raises(EfiVarError, match="do not fit 32 bits"):
        efivar.format_variable(efivar.Variable(1 << 32, b""))


# --- strings and lists: one helper, one line per case -------------------------------------------


def check_string_one(data: bytes, expected: str | None, error: str | None) -> None:
    if error is not None:
        with pytest.raises(EfiVarError) as exc:
            efivar.decode_string(data, "V")
        assert str(exc.value).startswith("V: ") and error in str(exc.value), exc.value
        assert isinstance(exc.value, PystateError)
    else:
        assert efivar.decode_string(data, "V") == expected
        assert efivar.encode_string(str(expected)) == data


@pytest.mark.parametrize(
    ("data", "expected", "error"),
    [
        (ID.encode(U16) + b"\0\0", ID, None),
        (b"\0\0", "", None),
        ("é€😀".encode(U16) + b"\0\0", "é€😀", None),  # a surrogate pair is fine
        (ID.encode(U16), None, "no NUL terminator"),
        (b"", None, "no NUL terminator"),
        (ID.encode(U16) + b"\0", None, "an odd length for UTF-16"),
        (b"a", None, "an odd length for UTF-16"),
        (b"a\0\0\0b\0\0\0", None, "a NUL inside the UTF-16 string"),
        (b"\x00\xd8\0\0", None, "not UTF-16LE"),  # a lone high surrogate
        (b"\x00\xdc\0\0", None, "not UTF-16LE"),  # a lone low surrogate
    ],
)
def test_decode_string(data: bytes, expected: str | None, error: str | None) -> None:
    check_string_one(data, expected, error)


@given(texts)
def test_string_round_trip(text: str) -> None:
    data = efivar.encode_string(text)
    assert data.endswith(b"\0\0") and len(data) % 2 == 0
    assert efivar.decode_string(data) == text


@pytest.mark.parametrize("text", ["a\0b", "\ud800"])
def test_encode_string_refuses(text: str) -> None:
    with pytest.raises(EfiVarError, match="V: "):
        efivar.encode_string(text, "V")


@pytest.mark.parametrize(
    ("data", "expected", "error"),
    [
        (b"", [], None),
        ("a.conf\0b.efi\0".encode(U16), ["a.conf", "b.efi"], None),
        ("auto-efi-shell\0".encode(U16), ["auto-efi-shell"], None),
        ("a.conf\0b.efi".encode(U16), None, "no NUL terminator"),
        ("a.conf\0\0b.efi\0".encode(U16), None, "an empty string in the list"),
        ("\0".encode(U16), None, "an empty string in the list"),
        ("a.conf\0".encode(U16)[:-1], None, "an odd length"),
        (b"\x00\xd8\0\0", None, "not UTF-16LE"),
    ],
)
def test_decode_list(data: bytes, expected: list[str] | None, error: str | None) -> None:
    if error is not None:
        with pytest.raises(EfiVarError, match=error):
            efivar.decode_list(data, "L")
    else:
        assert efivar.decode_list(data, "L") == expected
        assert efivar.encode_list(list(expected or [])) == data


@given(items)
def test_list_round_trip(entries: list[str]) -> None:
    assert efivar.decode_list(efivar.encode_list(entries)) == entries


def test_encode_list_refuses_an_empty_item() -> None:
    with pytest.raises(EfiVarError, match="an empty string"):
        efivar.encode_list(["a", ""])


@given(st.binary(max_size=64))
def test_decoders_raise_only_efivar_errors(data: bytes) -> None:
    for decode in (efivar.decode_string, efivar.decode_list, efivar.parse_variable):
        try:
            decode(data)
        except EfiVarError as exc:
            assert "\n" not in str(exc)


# --- the I/O, on a directory standing in for efivarfs ------------------------------------------


def test_read_write_delete(tmp_path: Path) -> None:
    name = efivar.FACTORY_RESET_REQUEST
    assert efivars.available(tmp_path) and not efivars.available(tmp_path / "absent")
    assert efivars.read(tmp_path, name) is None
    assert efivars.read_string(tmp_path, name) is None
    assert efivars.delete(tmp_path, name) is False

    efivars.write_string(tmp_path, name, ID)
    raw = (tmp_path / name).read_bytes()
    assert raw == b"\x07\0\0\0" + ID.encode(U16) + b"\0\0"  # what bootctl set-oneshot writes
    assert efivars.read(tmp_path, name) == efivar.Variable(7, ID.encode(U16) + b"\0\0")
    assert efivars.read_string(tmp_path, name) == ID

    # A shorter value replaces a longer one whole: no tail of the old one is left.
    efivars.write_string(tmp_path, name, "x")
    assert (tmp_path / name).read_bytes() == b"\x07\0\0\0x\0\0\0"

    assert efivars.delete(tmp_path, name) is True
    assert not (tmp_path / name).exists()


def test_read_list(tmp_path: Path) -> None:
    (tmp_path / efivar.LOADER_ENTRIES).write_bytes(
        b"\x06\0\0\0" + "debian.conf\0pystate-factory-reset.efi\0".encode(U16)
    )
    assert efivars.read_list(tmp_path, efivar.LOADER_ENTRIES) == [
        "debian.conf",
        "pystate-factory-reset.efi",
    ]
    assert efivars.read_list(tmp_path, efivar.LOADER_ENTRY_ONESHOT) is None


def test_malformed_variables_are_format_errors(tmp_path: Path) -> None:
    name = efivar.LOADER_ENTRY_SELECTED
    (tmp_path / name).write_bytes(b"\x06\0")
    with pytest.raises(EfiVarError, match=f"{name}: 2 bytes, shorter than its 4 bytes"):
        efivars.read(tmp_path, name)
    (tmp_path / name).write_bytes(b"\x06\0\0\0" + ID.encode(U16))
    with pytest.raises(EfiVarError, match=f"{name}: the UTF-16 string has no NUL terminator"):
        efivars.read_string(tmp_path, name)


def test_io_errors_name_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(EfiVarsError, match=f"cannot write EFI variable X-.* in {missing}"):
        efivars.write_string(missing, efivar.file_name("X", efivar.PYSTATE_GUID), "y")
    (tmp_path / efivar.LOADER_ENTRIES).mkdir()
    with pytest.raises(EfiVarsError, match="cannot read EFI variable LoaderEntries-"):
        efivars.read(tmp_path, efivar.LOADER_ENTRIES)


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\x07\0\0\0x\0\0\0")
    (tmp_path / efivar.LOADER_ENTRY_SELECTED).symlink_to(target)
    with pytest.raises(EfiVarsError, match="cannot read"):
        efivars.read(tmp_path, efivar.LOADER_ENTRY_SELECTED)


@needs_root
def test_immutable_variables_are_deleted_and_replaced(tmp_path: Path) -> None:
    """efivarfs makes pystate's own variables immutable (chattr +i): delete and write clear
    the flag first, as systemd does."""
    name = efivar.FACTORY_RESET_REQUEST
    efivars.write_string(tmp_path, name, ID)
    subprocess.run(["chattr", "+i", str(tmp_path / name)], check=True)
    with pytest.raises(PermissionError):
        os.unlink(tmp_path / name)  # what a plain unlink meets
    efivars.write_string(tmp_path, name, "other")
    assert efivars.read_string(tmp_path, name) == "other"
    subprocess.run(["chattr", "+i", str(tmp_path / name)], check=True)
    assert efivars.delete(tmp_path, name) is True
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("code", [errno.ENOTTY, errno.EOPNOTSUPP])
def test_file_systems_without_flags_are_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A directory on a file system that knows no FS_IOC_GETFLAGS (ENOTTY, EOPNOTSUPP)."""

    def no_flags(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    name = efivar.LOADER_ENTRY_ONESHOT
    efivars.write_string(tmp_path, name, ID)
    monkeypatch.setattr(fcntl, "ioctl", no_flags)
    efivars.write_string(tmp_path, name, "again")
    assert efivars.delete(tmp_path, name) is True


def test_a_failed_flags_call_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    name = efivar.LOADER_ENTRY_ONESHOT
    efivars.write_string(tmp_path, name, ID)
    monkeypatch.setattr(fcntl, "ioctl", denied)
    with pytest.raises(EfiVarsError, match="cannot delete .* as root"):
        efivars.delete(tmp_path, name)


def test_an_unmounted_efivarfs_is_not_available() -> None:
    """A UEFI boot without efivarfs mounted shows the mount point as an empty sysfs
    directory; sysfs itself stands in for it here."""
    assert not efivars.available(Path("/sys/kernel"))
    assert not efivars.available(Path("/nonexistent"))
