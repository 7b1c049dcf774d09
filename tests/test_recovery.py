"""Recovery keys: systemd-cryptenroll's format, tolerant parsing, strict refusals."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.recovery import (
    MODHEX_ALPHABET,
    RECOVERY_KEY_LENGTH,
    RecoveryKeyError,
    decode_modhex,
    encode_modhex,
    format_recovery_key,
    normalize_recovery_key,
    parse_recovery_key,
    recovery_passphrase,
)
from pystate_initrd.secret import new_recovery_key

# The shape systemd-cryptenroll prints (src/shared/recovery-key.c): 8 groups of 8 modhex.
SYSTEMD_SHAPE = re.compile(r"^([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}$")

KEY = "fkrhtkrn-cbccnvrh-lllcbfvj-gvrlgijv-nfgncclu-tkbvhtgt-ikcdhbjt-lgrntvdl"
# Modhex is hex spelled with other letters: the independent oracle for decoding.
TO_HEX = str.maketrans(MODHEX_ALPHABET, "0123456789abcdef")
KEY_BYTES = bytes.fromhex(KEY.replace("-", "").translate(TO_HEX))


def test_modhex_is_hex_with_another_alphabet() -> None:
    assert encode_modhex(bytes(range(16)) + b"\xff") == ("cccbcdcecfcgchcicjckclcncrctcucv" + "vv")
    data = bytes(range(256))
    assert encode_modhex(data).translate(TO_HEX) == data.hex()
    assert decode_modhex(encode_modhex(data)) == data


def test_known_key() -> None:
    assert format_recovery_key(KEY_BYTES) == KEY
    assert parse_recovery_key(KEY) == KEY_BYTES


def test_generate_has_systemds_shape() -> None:
    keys = {new_recovery_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(key) == RECOVERY_KEY_LENGTH == 71
        assert SYSTEMD_SHAPE.match(key), key
        assert format_recovery_key(parse_recovery_key(key)) == key


# What a person may type for KEY: all accepted, all the same bytes.
TYPED = [
    KEY,
    KEY.upper(),
    KEY.replace("-", ""),
    KEY.replace("-", " "),
    f"  {KEY}\n",
    "\t" + KEY.replace("-", "  ") + " \r\n",
    KEY.replace("-", "--"),
    "-" + KEY + "-",
    KEY[:20] + "-" + KEY[20:],
    " ".join(KEY.replace("-", "")),
    KEY.title(),
    KEY.replace("-", "\u00a0"),  # a no-break space from a copied web page
]


@pytest.mark.parametrize("typed", TYPED)
def test_typed_variants(typed: str) -> None:
    assert parse_recovery_key(typed) == KEY_BYTES
    assert normalize_recovery_key(typed) == KEY
    assert recovery_passphrase(typed) == bytearray(KEY, "ascii")


# (typed text, the error's words)
REFUSED = [
    ("", "has 0 characters, expected 64"),
    ("   \n", "has 0 characters, expected 64"),
    (KEY[:-1], "has 63 characters, expected 64"),
    (KEY + "c", "has 65 characters, expected 64"),
    (KEY + KEY, "has 128 characters, expected 64"),
    ("a" + KEY[1:], "character 1 ('a') is not one of cbdefghijklnrtuv"),
    (KEY[:9] + "0" + KEY[10:], "character 10 ('0') is not one of"),
    (KEY.replace("-", "_"), "character 9 ('_') is not one of"),
    (KEY.replace("-", ":"), "character 9 (':') is not one of"),
    ("\u212a" + KEY[1:], "character 1 ('\u212a') is not one of"),  # Kelvin sign: lower() is 'k'
    (KEY[:5] + "\0" + KEY[5:], "character 6 ('\\x00') is not one of"),
]


@pytest.mark.parametrize(("typed", "words"), REFUSED)
def test_refused(typed: str, words: str) -> None:
    with pytest.raises(RecoveryKeyError) as info:
        parse_recovery_key(typed)
    assert words in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, PystateError)


@pytest.mark.parametrize("raw", [b"", bytes(31), bytes(33)])
def test_format_refuses_wrong_length(raw: bytes) -> None:
    with pytest.raises(RecoveryKeyError, match="has 32 bytes"):
        format_recovery_key(raw)


@pytest.mark.parametrize("text", ["c", "ca", "CC", "cc cc"])
def test_decode_modhex_is_strict(text: str) -> None:
    with pytest.raises(RecoveryKeyError):
        decode_modhex(text)


# --- properties ------------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)


@given(st.binary(max_size=64))
def test_modhex_round_trip(data: bytes) -> None:
    text = encode_modhex(data)
    assert len(text) == 2 * len(data)
    assert set(text) <= set(MODHEX_ALPHABET)
    assert decode_modhex(text) == data


@given(keys)
def test_key_round_trip(raw: bytes) -> None:
    text = format_recovery_key(raw)
    assert SYSTEMD_SHAPE.match(text)
    assert parse_recovery_key(text) == raw


@st.composite
def typed_variants(draw: st.DrawFn) -> tuple[bytes, str]:
    """A key and how someone might type it: any case, any dashes and spaces between."""
    raw = draw(keys)
    chars = encode_modhex(raw)
    separator = st.text(alphabet=" -\t", max_size=3)
    parts = [draw(st.text(alphabet=" \t\n", max_size=2))]
    for char in chars:
        parts.append(char.upper() if draw(st.booleans()) else char)
        parts.append(draw(separator))
    return raw, "".join(parts)


@given(typed_variants())
def test_any_typed_variant_parses_to_the_same_bytes(case: tuple[bytes, str]) -> None:
    raw, typed = case
    assert parse_recovery_key(typed) == raw
    assert normalize_recovery_key(typed) == format_recovery_key(raw)


@settings(max_examples=500)
@given(st.one_of(st.text(), st.text(alphabet=MODHEX_ALPHABET + "- Aa0xX", max_size=80)))
def test_arbitrary_text_parses_or_raises_recovery_key_error(text: str) -> None:
    try:
        raw = parse_recovery_key(text)
    except RecoveryKeyError as e:
        assert "\n" not in str(e)
    else:
        assert len(raw) == 32
        assert parse_recovery_key(format_recovery_key(raw)) == raw
