"""The re-seal's journal: a `pystate-reseal` LUKS2 token, and what a boot does with it (pure).

A re-seal changes the header three times (add the new TPM keyslot, point the
`pystate-tpm2` token at it, kill the old keyslot); a power cut between two of them
would leave a keyslot that no token names and whose secret was only ever in memory:
pystate could never prove it its own, so could never free it, and 32 such cuts would
use up LUKS2's keyslots for good. So before the first change the re-seal writes this
record: the keyslot it is about to add, the new token (its sealed blob: the proof),
and the keyslot it will retire with that keyslot's KDF salt (its identity: a keyslot
added later in the same place has another). The record has no keyslots of its own
(`"keyslots": []`), holds no secret, and is removed as the last change.

A boot that finds one finishes the re-seal (`next_action`): it kills nothing that the
record, the header and the TPM do not together prove to be pystate's.

The header is on the unencrypted partition: the record is hostile input. The worst a
forged one can do is what its forger could do to the header directly (kill a keyslot
whose salt it names); it can never make pystate trust a key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pystate_initrd.formats.token import (
    MAX_KEYSLOT,
    TOKEN_TYPE,
    TokenError,
    _show,
    decode_token,
    encode_token,
)
from pystate_initrd.formats.tpm2_policy import SealedKey

RECORD_TYPE = "pystate-reseal"
RECORD_VERSION = 1
MAX_SALT_CHARS = 256  # a LUKS2 KDF salt is 32 bytes: 44 base64 characters


@dataclass(frozen=True)
class ResealRecord:
    keyslot: int  # the keyslot the re-seal adds
    sealed: SealedKey  # what opens it, sealed by the TPM (the proof that it is pystate's)
    retire: int | None  # the keyslot it retires, if any
    retire_salt: str | None  # that keyslot's kdf.salt when the record was written


def encode_record(record: ResealRecord) -> str:
    """The record as compact JSON for `cryptsetup token import` (checked by decoding it)."""
    obj: dict[str, Any] = {
        "type": RECORD_TYPE,
        "keyslots": [],
        "version": RECORD_VERSION,
        "keyslot": record.keyslot,
        "token": encode_token(record.sealed, record.keyslot),
        "retire": record.retire,
        "retire-salt": record.retire_salt,
    }
    if decode_record(obj) != record:
        raise TokenError("re-seal record does not survive encoding")
    return json.dumps(obj, separators=(",", ":"))


def _slot(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_KEYSLOT:
        raise TokenError(f"re-seal record: {what} {_show(value)} is not a keyslot 0-31")
    return value


def decode_record(obj: Mapping[str, Any]) -> ResealRecord:
    """A record from a header's tokens; TokenError naming what is wrong with it."""
    for name in ("type", "keyslots", "version", "keyslot", "token", "retire", "retire-salt"):
        if name not in obj:
            raise TokenError(f"re-seal record has no {name!r}")
    if obj["type"] != RECORD_TYPE:
        raise TokenError(f"token type is not {RECORD_TYPE!r}")
    if obj["keyslots"] != []:
        raise TokenError("re-seal record names keyslots")
    if type(obj["version"]) is not int or obj["version"] != RECORD_VERSION:
        raise TokenError(f"re-seal record version is not {RECORD_VERSION}")
    keyslot = _slot(obj["keyslot"], "keyslot")
    token = obj["token"]
    if not isinstance(token, Mapping) or token.get("type") != TOKEN_TYPE:
        raise TokenError(f"re-seal record's token is not a {TOKEN_TYPE} token")
    sealed, named = decode_token(token)
    if named != keyslot:
        raise TokenError(f"re-seal record's token names keyslot {named}, not {keyslot}")
    retire, salt = obj["retire"], obj["retire-salt"]
    if retire is None:
        if salt is not None:
            raise TokenError("re-seal record has a retire-salt but no keyslot to retire")
        return ResealRecord(keyslot, sealed, None, None)
    retire = _slot(retire, "retire")
    if retire == keyslot:
        raise TokenError(f"re-seal record adds and retires keyslot {keyslot}")
    if not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT_CHARS:
        raise TokenError("re-seal record's retire-salt is not a salt")
    return ResealRecord(keyslot, sealed, retire, salt)


def records(tokens: Mapping[int, Mapping[str, Any]]) -> list[tuple[int, ResealRecord | str]]:
    """Every re-seal record among a header's tokens: (token id, the record or why not)."""
    found: list[tuple[int, ResealRecord | str]] = []
    for token_id, token in sorted(tokens.items()):
        if token.get("type") != RECORD_TYPE:
            continue
        try:
            found.append((token_id, decode_record(token)))
        except TokenError as exc:
            found.append((token_id, str(exc)))
    return found


class Action(Enum):
    DROP = "drop"  # the new keyslot is not there, or a token names it: only tidy up
    PROVE = "prove"  # it is there and unnamed: ours only if the record's blob opens it


@dataclass(frozen=True)
class Plan:
    action: Action
    retire: int | None  # the keyslot to kill once the new one is named by a token


def next_action(
    record: ResealRecord,
    keyslots: Mapping[int, str | None],
    named: Set[int],
    protected: Set[int],
) -> Plan:
    """What finishing an interrupted re-seal does (pure).

    `keyslots`: every keyslot of the header now, with its kdf salt; `named`: the
    keyslots some token names (the record itself names none); `protected`: keyslots
    never touched (the recovery keyslot). The old keyslot is retired only while it is
    the very keyslot the record saw (same salt), no token names it, and the new keyslot
    is named (`retire` of a PROVE plan applies once the proof has named it).
    """
    if record.keyslot in protected or record.keyslot not in keyslots:
        return Plan(Action.DROP, None)
    retire = record.retire
    if (
        retire is None
        or retire in protected
        or retire in named
        or retire not in keyslots
        or keyslots[retire] != record.retire_salt
    ):
        retire = None
    if record.keyslot in named:
        return Plan(Action.DROP, retire)
    return Plan(Action.PROVE, retire)
