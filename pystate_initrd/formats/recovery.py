"""The recovery key: 32 random bytes shown as 64 modhex characters (pure).

The format is systemd-cryptenroll's (src/shared/recovery-key.c): modhex, the
alphabet ``cbdefghijklnrtuv`` standing for the hex digits 0-f (its letters sit
in the same place on most keyboard layouts), in eight dash-separated groups of
eight characters, 71 characters in all::

    fkrhtkrn-cbccnvrh-lllcbfvj-gvrlgijv-nfgncclu-tkbvhtgt-ikcdhbjt-lgrntvdl

The passphrase given to cryptsetup, at enrolment and at unlock alike, is that
normalized 71-character text in ASCII (lower case, dashes, no newline), exactly
what systemd-cryptenroll enrols, so a pystate image also opens with plain
``cryptsetup open`` or systemd-cryptsetup when the key is typed as printed.

What a person types is parsed tolerantly (upper case, spaces, missing or extra
dashes, surrounding whitespace) but strictly in substance: exactly 64 modhex
characters, nothing else.
"""

from __future__ import annotations

from pystate_initrd.errors import PystateError

MODHEX_ALPHABET = "cbdefghijklnrtuv"
RECOVERY_KEY_BYTES = 32
RECOVERY_KEY_CHARACTERS = 2 * RECOVERY_KEY_BYTES  # 64 modhex characters
GROUP = 8  # characters per dash-separated group
RECOVERY_KEY_LENGTH = RECOVERY_KEY_CHARACTERS + RECOVERY_KEY_CHARACTERS // GROUP - 1  # 71

_VALUE = {c: i for i, c in enumerate(MODHEX_ALPHABET)}
_VALUE.update({c.upper(): i for i, c in enumerate(MODHEX_ALPHABET)})
_SEPARATORS = frozenset("-")


class RecoveryKeyError(PystateError):
    """Text that is not a recovery key."""


def encode_modhex(data: bytes | bytearray) -> str:
    """Each byte as two modhex characters, high nibble first."""
    return "".join(MODHEX_ALPHABET[b >> 4] + MODHEX_ALPHABET[b & 0xF] for b in data)


def decode_modhex(text: str) -> bytes:
    """Strict inverse of encode_modhex: an even number of lower-case modhex characters."""
    if len(text) % 2:
        raise RecoveryKeyError(f"modhex text has an odd number of characters ({len(text)})")
    values = []
    for position, char in enumerate(text, 1):
        if char not in MODHEX_ALPHABET:
            raise RecoveryKeyError(
                f"character {position} ({char!r}) is not a modhex character ({MODHEX_ALPHABET})"
            )
        values.append(_VALUE[char])
    return bytes(hi << 4 | lo for hi, lo in zip(values[::2], values[1::2], strict=True))


def format_recovery_key(raw: bytes | bytearray) -> str:
    """The 71-character dashed form of a 32-byte key."""
    if len(raw) != RECOVERY_KEY_BYTES:
        raise RecoveryKeyError(f"a recovery key has {RECOVERY_KEY_BYTES} bytes, not {len(raw)}")
    text = encode_modhex(raw)
    return "-".join(text[i : i + GROUP] for i in range(0, len(text), GROUP))


def parse_recovery_key(text: str) -> bytes:
    """The 32 bytes of a typed recovery key; RecoveryKeyError says what is wrong.

    Ignored: letter case, dashes and white space anywhere. Refused: any other
    character, and any count of modhex characters but 64.
    """
    values = []
    for position, char in enumerate(text, 1):
        value = _VALUE.get(char)
        if value is not None:
            values.append(value)
        elif not (char in _SEPARATORS or char.isspace()):
            raise RecoveryKeyError(
                f"recovery key character {position} ({char!r}) is not one of" f" {MODHEX_ALPHABET}",
                hint="a recovery key is 64 letters from that set, in groups of 8",
            )
    if len(values) != RECOVERY_KEY_CHARACTERS:
        raise RecoveryKeyError(
            f"recovery key has {len(values)} characters, expected {RECOVERY_KEY_CHARACTERS}",
            hint="dashes and spaces are not counted",
        )
    return bytes(hi << 4 | lo for hi, lo in zip(values[::2], values[1::2], strict=True))


def normalize_recovery_key(text: str) -> str:
    """The canonical 71-character form of a typed recovery key."""
    return format_recovery_key(parse_recovery_key(text))


def recovery_passphrase(text: str) -> bytearray:
    """What cryptsetup gets as the passphrase: the canonical form in ASCII, in a bytearray."""
    return bytearray(normalize_recovery_key(text), "ascii")
