"""The `pystate-tpm2` LUKS2 token: a sealed key as JSON in the LUKS2 header (pure).

The header is read from the unencrypted state partition, so the token is hostile
input until proven otherwise: `decode_token` accepts exactly what `encode_token`
writes (docs/tpm2.md lists the fields) and raises `TokenError` with one specific
reason for anything else. Unknown keys are tolerated (and ignored) so that a
later pystate may add fields without breaking an older initrd; every known key
is required and checked.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import pcr_diagnosis, tcg_eventlog
from pystate_initrd.formats.tpm2_policy import (
    BANKS,
    NAME_SIZE,
    PCR_COUNT,
    PCR_VOLUME,
    POLICY_HASH_SIZE,
    PRIMARY_ALG,
    SRK_HANDLE,
    LoggedEvent,
    PcrLog,
    SealedKey,
    Tpm2Error,
    bank_digest_size,
    policy_pcr_digest,
)

TOKEN_TYPE = "pystate-tpm2"
TOKEN_VERSION = 1
MAX_TOKEN_BYTES = 64 * 1024
MAX_KEYSLOT = 31  # LUKS2 keyslots are 0..31
MAX_PUBLIC = 1024  # TPM2B_PUBLIC of a sealed object is ~80 bytes; RSA-4096 keys ~600
MAX_PRIVATE = 1024  # TPM2B_PRIVATE of a 32-byte secret is ~160 bytes
_TPM_ALG_KEYEDHASH = 0x0008
_TPM_ALG_SHA256 = 0x000B

FIELDS = (
    "type",
    "keyslots",
    "version",
    "tpm2-blob-public",
    "tpm2-blob-private",
    "tpm2-pcr-bank",
    "tpm2-pcrs",
    "tpm2-primary-alg",
    "tpm2-policy-hash",
    "pystate-pcr15",
)
# Optional: absent in tokens of pystate before issue 10; strictly checked when present.
PCR_VALUES = "pystate-pcr-values"
PCR_EVENTS = "pystate-pcr-events"
# Optional (issue 13): absent = the transient ECC primary sealed it, name not recorded.
PARENT = "pystate-parent"  # "0x81000001": sealed under the persistent SRK
PARENT_NAME = "pystate-parent-name"  # the parent's TPM name at sealing, hex
# A PCR's event count in the token: tokens written while the log cap was 65536 stay valid.
MAX_LOGGED_COUNT = 65536


class TokenError(PystateError):
    """A `pystate-tpm2` token that is not exactly what pystate writes."""


def encode_token(key: SealedKey, keyslot: int) -> dict[str, Any]:
    """The token object for `cryptsetup token import` (validated like a decoded one)."""
    if isinstance(keyslot, bool) or not isinstance(keyslot, int):
        raise TokenError(f"keyslot {keyslot!r} is not an integer")
    token: dict[str, Any] = {
        "type": TOKEN_TYPE,
        "keyslots": [str(keyslot)],
        "version": TOKEN_VERSION,
        "tpm2-blob-public": base64.b64encode(key.public).decode(),
        "tpm2-blob-private": base64.b64encode(key.private).decode(),
        "tpm2-pcr-bank": key.bank,
        "tpm2-pcrs": list(key.pcrs),
        "tpm2-primary-alg": key.primary_alg,
        "tpm2-policy-hash": key.policy_hash.hex(),
        "pystate-pcr15": key.pcr15_zero,
    }
    if key.parent is not None:
        token[PARENT] = f"{key.parent:#010x}"
    if key.parent_name is not None:
        token[PARENT_NAME] = key.parent_name.hex()
    if key.pcr_values is not None:
        token[PCR_VALUES] = {str(i): v.hex() for i, v in key.pcr_values}
    if key.pcr_logs:
        token[PCR_EVENTS] = {
            str(p.pcr): {
                "count": p.count,
                "events": [
                    [tcg_eventlog.event_type_name(e.type), e.name, e.digest.hex()] for e in p.events
                ],
            }
            for p in key.pcr_logs
        }
    decoded, slot = _decode_object(token)  # never write what we would refuse to read
    if decoded != key or slot != keyslot:
        raise TokenError("sealed key does not survive encoding")
    return token


def encode_token_json(key: SealedKey, keyslot: int) -> str:
    """`encode_token` as compact JSON text."""
    return json.dumps(encode_token(key, keyslot), separators=(",", ":"))


@dataclass(frozen=True)
class FoundToken:
    """A pystate-tpm2 token of a LUKS2 header: decoded, or the reason it is not usable."""

    token_id: int
    sealed: SealedKey | None
    keyslot: int | None
    error: str | None


def pystate_tokens(tokens: Mapping[int, Mapping[str, Any]]) -> list[FoundToken]:
    """Every pystate-tpm2 token among a header's tokens (luks2.token_dicts), in id order."""
    found = []
    for token_id, token in sorted(tokens.items()):
        if token.get("type") != TOKEN_TYPE:
            continue
        try:
            sealed, slot = decode_token(token)
        except TokenError as exc:
            found.append(FoundToken(token_id, None, None, str(exc)))
        else:
            found.append(FoundToken(token_id, sealed, slot, None))
    return found


def usable_token(tokens: Mapping[int, Mapping[str, Any]]) -> tuple[int, SealedKey, int]:
    """(token id, sealed key, keyslot) of the first usable pystate-tpm2 token.

    TokenError naming every unusable one, or saying there is none.
    """
    found = pystate_tokens(tokens)
    for t in found:
        if t.sealed is not None and t.keyslot is not None:
            return t.token_id, t.sealed, t.keyslot
    errors = [f"token {t.token_id}: {t.error}" for t in found]
    raise TokenError("; ".join(errors) or f"no {TOKEN_TYPE} token in the LUKS2 header")


def _refuse_constant(name: str) -> Any:
    raise TokenError(f"token JSON contains {name}, which is not JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise TokenError(f"token JSON has the key {k!r} twice")
        obj[k] = v
    return obj


def decode_token(text: str | bytes | bytearray | Mapping[str, Any]) -> tuple[SealedKey, int]:
    """The sealed key and keyslot of a `pystate-tpm2` token; TokenError if it is not one.

    `text` is the JSON text (`cryptsetup token export`) or the already-parsed object
    (from a LUKS2 header's `tokens` section).
    """
    if isinstance(text, Mapping):
        return _decode_object(text)
    if isinstance(text, str):
        # Text is checked as the UTF-8 bytes it stands for; a str longer than the limit in
        # characters is over it in bytes too, and is refused before it is encoded.
        if len(text) > MAX_TOKEN_BYTES:
            raise TokenError(f"token of {len(text)}+ bytes exceeds {MAX_TOKEN_BYTES} bytes")
        raw = text.encode("utf-8", errors="surrogatepass")
    elif isinstance(text, bytes | bytearray):
        raw = bytes(text)
    else:
        raise TokenError(f"token of type {type(text).__name__} is not JSON text")
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenError(f"token of {len(raw)} bytes exceeds {MAX_TOKEN_BYTES} bytes")
    try:
        decoded = raw.decode("utf-8")  # a lone surrogate in a str fails here, as in bytes
    except UnicodeDecodeError:
        raise TokenError("token is not valid UTF-8") from None
    try:
        obj = json.loads(decoded, object_pairs_hook=_unique_object, parse_constant=_refuse_constant)
    except TokenError:
        raise
    except RecursionError:
        raise TokenError("token JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and int() of a too-long number
        raise TokenError(f"token is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise TokenError(f"token JSON is a {type(obj).__name__}, not an object")
    return _decode_object(obj)


def _decode_object(obj: Mapping[str, Any]) -> tuple[SealedKey, int]:
    for name in FIELDS:
        if name not in obj:
            raise TokenError(f"token has no {name!r}")
    if obj["type"] != TOKEN_TYPE:
        raise TokenError(f"token type {_show(obj['type'])} is not {TOKEN_TYPE!r}")
    version = obj["version"]
    if type(version) is not int or version != TOKEN_VERSION:
        raise TokenError(f"token version {_show(version)} is not {TOKEN_VERSION}")
    keyslot = _keyslot(obj["keyslots"])

    bank = obj["tpm2-pcr-bank"]
    if not isinstance(bank, str) or bank not in BANKS:
        raise TokenError(f"tpm2-pcr-bank {_show(bank)} is not one of {', '.join(BANKS)}")
    pcrs = _pcrs(obj["tpm2-pcrs"])
    primary = obj["tpm2-primary-alg"]
    if primary != PRIMARY_ALG:
        raise TokenError(f"tpm2-primary-alg {_show(primary)} is not {PRIMARY_ALG!r}")
    pcr15 = obj["pystate-pcr15"]
    if not isinstance(pcr15, bool):
        raise TokenError(f"pystate-pcr15 {_show(pcr15)} is not true or false")
    if pcr15 and PCR_VOLUME not in pcrs:
        raise TokenError(f"pystate-pcr15 is true but PCR {PCR_VOLUME} is not in tpm2-pcrs")

    policy_hash = _policy_hash(obj["tpm2-policy-hash"])
    public = _blob(obj["tpm2-blob-public"], "tpm2-blob-public", MAX_PUBLIC)
    private = _blob(obj["tpm2-blob-private"], "tpm2-blob-private", MAX_PRIVATE)
    _check_public(public, policy_hash)
    measured = tuple(i for i in pcrs if not (pcr15 and i == PCR_VOLUME))
    values = None
    if PCR_VALUES in obj:
        values = _pcr_values(obj[PCR_VALUES], bank, measured, pcr15, policy_hash)
    parent = None
    if PARENT in obj:
        if obj[PARENT] != f"{SRK_HANDLE:#010x}":
            raise TokenError(f"{PARENT} {_show(obj[PARENT])} is not {SRK_HANDLE:#010x}")
        parent = SRK_HANDLE
    parent_name = None
    if PARENT_NAME in obj:
        parent_name = _hex(obj[PARENT_NAME], NAME_SIZE, PARENT_NAME)
        if parent_name[:2] != b"\x00\x0b":
            raise TokenError(f"{PARENT_NAME} is not a sha256 name (000b…)")
    logs: tuple[PcrLog, ...] = ()
    if PCR_EVENTS in obj:
        if values is None:
            raise TokenError(f"{PCR_EVENTS} without {PCR_VALUES}")
        logs = _pcr_events(obj[PCR_EVENTS], bank, dict(values))
    key = SealedKey(
        public=public,
        private=private,
        bank=bank,
        pcrs=pcrs,
        policy_hash=policy_hash,
        pcr15_zero=pcr15,
        primary_alg=PRIMARY_ALG,
        parent=parent,
        parent_name=parent_name,
        pcr_values=values,
        pcr_logs=logs,
    )
    return key, keyslot


def _show(value: Any) -> str:
    """A value for a one-line message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _keyslot(value: Any) -> int:
    if not isinstance(value, list) or len(value) != 1:
        raise TokenError(f"keyslots {_show(value)} is not a list of one keyslot")
    slot = value[0]
    if (
        not isinstance(slot, str)
        or not slot.isascii()
        or not slot.isdigit()
        or (len(slot) > 1 and slot[0] == "0")
        or len(slot) > 2
        or int(slot) > MAX_KEYSLOT
    ):
        raise TokenError(f"keyslot {_show(slot)} is not a decimal string 0-{MAX_KEYSLOT}")
    return int(slot)


def _pcrs(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise TokenError(f"tpm2-pcrs {_show(value)} is not a non-empty list")
    if len(value) > PCR_COUNT:
        raise TokenError(f"tpm2-pcrs lists {len(value)} PCRs, more than {PCR_COUNT}")
    for i in value:
        if type(i) is not int or not 0 <= i < PCR_COUNT:
            raise TokenError(f"tpm2-pcrs entry {_show(i)} is not a PCR index 0-{PCR_COUNT - 1}")
    if len(set(value)) != len(value):
        raise TokenError(f"tpm2-pcrs {_show(value)} lists a PCR twice")
    return tuple(sorted(value))


def _pcr_index(text: Any, allowed: tuple[int, ...], name: str) -> int:
    if (
        not isinstance(text, str)
        or not text.isascii()
        or not text.isdigit()
        or len(text) > 2
        or (len(text) > 1 and text[0] == "0")
        or int(text) not in allowed
    ):
        listed = ",".join(map(str, allowed)) or "none"
        raise TokenError(f"{name} key {_show(text)} is not a measured PCR of the policy ({listed})")
    return int(text)


def _hex(value: Any, size: int, name: str) -> bytes:
    if (
        not isinstance(value, str)
        or len(value) != 2 * size
        or not all(c in "0123456789abcdef" for c in value)
    ):
        raise TokenError(f"{name} {_show(value)} is not {2 * size} lowercase hex digits")
    return bytes.fromhex(value)


def _pcr_values(
    value: Any, bank: str, measured: tuple[int, ...], pcr15: bool, policy_hash: bytes
) -> tuple[tuple[int, bytes], ...]:
    """The sealed values: exactly the measured PCRs, reproducing tpm2-policy-hash."""
    if not isinstance(value, dict):
        raise TokenError(f"{PCR_VALUES} {_show(value)} is not an object")
    size = bank_digest_size(bank)
    values: dict[int, bytes] = {}
    for k, v in value.items():
        values[_pcr_index(k, measured, PCR_VALUES)] = _hex(v, size, f"{PCR_VALUES} of PCR {k}")
    missing = [i for i in measured if i not in values]
    if missing:
        raise TokenError(f"{PCR_VALUES} lacks PCR {','.join(map(str, missing))}")
    policy = dict(values)
    if pcr15:
        policy[PCR_VOLUME] = bytes(size)
    try:
        digest = policy_pcr_digest(bank, policy)
    except Tpm2Error as exc:  # unreachable after the checks above; still one TokenError
        raise TokenError(f"{PCR_VALUES}: {exc}") from None
    if digest != policy_hash:
        raise TokenError(f"{PCR_VALUES} do not give tpm2-policy-hash: forged or damaged")
    return tuple(sorted(values.items()))


def _pcr_events(value: Any, bank: str, values: dict[int, bytes]) -> tuple[PcrLog, ...]:
    """The recorded firmware events: capped, and a complete list replays to its sealed
    value (a forged list must not name the wrong event)."""
    if not isinstance(value, dict):
        raise TokenError(f"{PCR_EVENTS} {_show(value)} is not an object")
    size = bank_digest_size(bank)
    logs = []
    total = 0
    for k, entry in value.items():
        pcr = _pcr_index(k, tuple(sorted(values)), PCR_EVENTS)
        where = f"{PCR_EVENTS} of PCR {pcr}"
        if not isinstance(entry, dict) or set(entry) != {"count", "events"}:
            raise TokenError(f"{where} is not an object of count and events")
        count, events = entry["count"], entry["events"]
        if type(count) is not int or not 0 <= count <= MAX_LOGGED_COUNT:
            raise TokenError(f"{where}: count {_show(count)} is not 0-{MAX_LOGGED_COUNT}")
        if not isinstance(events, list) or len(events) > min(
            count, pcr_diagnosis.MAX_EVENTS_PER_PCR
        ):
            raise TokenError(
                f"{where}: events is not a list of at most "
                f"min(count, {pcr_diagnosis.MAX_EVENTS_PER_PCR}) events"
            )
        total += len(events)
        if total > pcr_diagnosis.MAX_EVENTS_RECORDED:
            raise TokenError(f"{PCR_EVENTS} holds more than {pcr_diagnosis.MAX_EVENTS_RECORDED}")
        logged = []
        for e in events:
            if not isinstance(e, list) or len(e) != 3:
                raise TokenError(f"{where}: event {_show(e)} is not [type, name, digest]")
            kind = tcg_eventlog.event_type_from_name(e[0]) if isinstance(e[0], str) else None
            if kind is None:
                raise TokenError(f"{where}: event type {_show(e[0])} is not an event type")
            name = e[1]
            if (
                not isinstance(name, str)
                or len(name) > tcg_eventlog.MAX_NAME
                or not all(c.isascii() and c.isprintable() for c in name)
            ):
                raise TokenError(f"{where}: event name {_show(name)} is not short printable ASCII")
            logged.append(LoggedEvent(kind, name, _hex(e[2], size, f"{where}: digest")))
        log = PcrLog(pcr, count, tuple(logged))
        if log.complete and pcr_diagnosis.replay_summary(bank, log) != values[pcr]:
            raise TokenError(f"{where} do not replay to its sealed value: forged or damaged")
        logs.append(log)
    return tuple(sorted(logs, key=lambda p: p.pcr))


def _policy_hash(value: Any) -> bytes:
    want = 2 * POLICY_HASH_SIZE
    if (
        not isinstance(value, str)
        or len(value) != want
        or not all(c in "0123456789abcdef" for c in value)
    ):
        raise TokenError(f"tpm2-policy-hash {_show(value)} is not {want} lowercase hex digits")
    return bytes.fromhex(value)


def _blob(value: Any, name: str, limit: int) -> bytes:
    if not isinstance(value, str):
        raise TokenError(f"{name} {_show(value)} is not a base64 string")
    if len(value) > 4 * ((limit + 2) // 3):
        raise TokenError(f"{name} is longer than {limit} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise TokenError(f"{name} is not valid base64") from None
    if base64.b64encode(raw).decode() != value:
        raise TokenError(f"{name} is not canonical base64")
    if not 3 <= len(raw) <= limit:
        raise TokenError(f"{name} has {len(raw)} bytes, expected 3-{limit}")
    size = int.from_bytes(raw[:2], "big")
    if size != len(raw) - 2:
        raise TokenError(f"{name} declares {size} bytes but holds {len(raw) - 2}")
    return raw


def _check_public(public: bytes, policy_hash: bytes) -> None:
    """The public area is a sha256 sealed data object whose authPolicy is the token's hash.

    TPM2B_PUBLIC: size(2) type(2) nameAlg(2) objectAttributes(4) authPolicy(2 + n) …
    """
    if len(public) < 12:
        raise TokenError("tpm2-blob-public is too short for a TPM2 public area")
    kind = int.from_bytes(public[2:4], "big")
    name_alg = int.from_bytes(public[4:6], "big")
    if kind != _TPM_ALG_KEYEDHASH:
        raise TokenError(f"tpm2-blob-public is of type {kind:#06x}, not a sealed data object")
    if name_alg != _TPM_ALG_SHA256:
        raise TokenError(f"tpm2-blob-public has name algorithm {name_alg:#06x}, not sha256")
    size = int.from_bytes(public[10:12], "big")
    if public[12 : 12 + size] != policy_hash or size != len(policy_hash):
        raise TokenError("tpm2-policy-hash is not the policy in tpm2-blob-public")
