"""token.py: the pystate-tpm2 LUKS2 token, a table of refusals plus hypothesis properties."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import pcr_diagnosis, tcg_eventlog, tpm2_policy
from pystate_initrd.formats.token import (
    MAX_TOKEN_BYTES,
    TokenError,
    decode_token,
    encode_token,
    encode_token_json,
)
from pystate_initrd.formats.tpm2_policy import LoggedEvent, PcrLog, SealedKey


def tpm2b(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


def sealed_public(policy: bytes, name_alg: int = 0x000B, kind: int = 0x0008) -> bytes:
    """A TPM2B_PUBLIC shaped like tpm2_create's sealed object (keyedhash, null scheme)."""
    body = (
        kind.to_bytes(2, "big")
        + name_alg.to_bytes(2, "big")
        + (0x492).to_bytes(4, "big")  # fixedtpm|fixedparent|adminwithpolicy|noda
        + tpm2b(policy)
        + (0x0010).to_bytes(2, "big")  # TPM_ALG_NULL scheme
        + tpm2b(bytes(range(32)))  # unique
    )
    return tpm2b(body)


POLICY = tpm2_policy.policy_pcr_digest("sha256", {7: bytes(32), 15: bytes(32)})
KEY = SealedKey(
    public=sealed_public(POLICY),
    private=tpm2b(bytes(range(158))),
    bank="sha256",
    pcrs=(7, 15),
    policy_hash=POLICY,
    pcr15_zero=True,
)
GOOD = encode_token(KEY, 1)


def test_encode_layout() -> None:
    assert GOOD == {
        "type": "pystate-tpm2",
        "keyslots": ["1"],
        "version": 1,
        "tpm2-blob-public": base64.b64encode(KEY.public).decode(),
        "tpm2-blob-private": base64.b64encode(KEY.private).decode(),
        "tpm2-pcr-bank": "sha256",
        "tpm2-pcrs": [7, 15],
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": POLICY.hex(),
        "pystate-pcr15": True,
    }
    assert json.loads(encode_token_json(KEY, 1)) == GOOD


def test_round_trip_forms() -> None:
    text = encode_token_json(KEY, 1)
    for form in (text, text.encode(), bytearray(text.encode()), GOOD):
        assert decode_token(form) == (KEY, 1)


def with_(base: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` (default GOOD) with fields changed (``_`` for ``-``) or DROPped."""
    token = dict(GOOD if base is None else base)
    for k, v in changes.items():
        name = k.replace("_", "-")
        if v is DROP:
            del token[name]
        else:
            token[name] = v
    return token


DROP = object()
B64 = base64.b64encode


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (with_(type="systemd-tpm2"), "token type 'systemd-tpm2' is not 'pystate-tpm2'"),
        (with_(type=DROP), "token has no 'type'"),
        (with_(version=2), "token version 2 is not 1"),
        (with_(version=True), "token version True is not 1"),
        (with_(version="1"), "token version '1' is not 1"),
        (with_(keyslots=[]), "not a list of one keyslot"),
        (with_(keyslots=["1", "2"]), "not a list of one keyslot"),
        (with_(keyslots="1"), "not a list of one keyslot"),
        (with_(keyslots=[1]), "keyslot 1 is not a decimal string"),
        (with_(keyslots=["32"]), "keyslot '32' is not a decimal string 0-31"),
        (with_(keyslots=["01"]), "keyslot '01'"),
        (with_(keyslots=["-1"]), "keyslot '-1'"),
        (with_(keyslots=[" 1"]), "keyslot ' 1'"),
        (with_(keyslots=["\u0661"]), "is not a decimal string"),
        (with_(keyslots=["999999999999999999999"]), "is not a decimal string"),
        (with_(tpm2_pcr_bank="sm3_256"), "tpm2-pcr-bank 'sm3_256' is not one of"),
        (with_(tpm2_pcr_bank=None), "tpm2-pcr-bank None"),
        (with_(tpm2_pcrs=[]), "tpm2-pcrs [] is not a non-empty list"),
        (with_(tpm2_pcrs=[7, 7, 15]), "lists a PCR twice"),
        (with_(tpm2_pcrs=[7, 24]), "tpm2-pcrs entry 24"),
        (with_(tpm2_pcrs=[7, -1]), "tpm2-pcrs entry -1"),
        (with_(tpm2_pcrs=[True, 15]), "tpm2-pcrs entry True"),
        (with_(tpm2_pcrs=[7.0, 15]), "tpm2-pcrs entry 7.0"),
        (with_(tpm2_pcrs=list(range(24)) * 2), "more than 24"),
        (with_(tpm2_pcrs=[7]), "pystate-pcr15 is true but PCR 15 is not in tpm2-pcrs"),
        (with_(tpm2_primary_alg="rsa"), "tpm2-primary-alg 'rsa' is not 'ecc'"),
        (with_(pystate_pcr15=1), "pystate-pcr15 1 is not true or false"),
        (with_(tpm2_policy_hash=POLICY.hex().upper()), "not 64 lowercase hex digits"),
        (with_(tpm2_policy_hash=POLICY.hex()[:40]), "not 64 lowercase hex digits"),
        (with_(tpm2_policy_hash=" " + POLICY.hex()[1:]), "not 64 lowercase hex digits"),
        (with_(tpm2_policy_hash="00" * 32), "is not the policy in tpm2-blob-public"),
        (with_(tpm2_blob_public=7), "tpm2-blob-public 7 is not a base64 string"),
        (with_(tpm2_blob_public="AAA*"), "tpm2-blob-public is not valid base64"),
        (with_(tpm2_blob_public="AAE"), "tpm2-blob-public is not valid base64"),
        (with_(tpm2_blob_public="AAF="), "tpm2-blob-public is not canonical base64"),
        (with_(tpm2_blob_public="AA=="), "tpm2-blob-public has 1 bytes"),
        (with_(tpm2_blob_public=B64(tpm2b(bytes(1100))).decode()), "longer than 1024"),
        (with_(tpm2_blob_public=B64(b"\x00\x09abc").decode()), "declares 9 bytes but holds 3"),
        (with_(tpm2_blob_public=B64(tpm2b(b"abcdefgh")).decode()), "too short"),
        (
            with_(tpm2_blob_public=B64(sealed_public(POLICY, kind=0x23)).decode()),
            "of type 0x0023, not a sealed data object",
        ),
        (
            with_(tpm2_blob_public=B64(sealed_public(POLICY, name_alg=4)).decode()),
            "name algorithm 0x0004, not sha256",
        ),
        (with_(tpm2_blob_private=""), "tpm2-blob-private has 0 bytes"),
        (with_(tpm2_blob_private=B64(tpm2b(bytes(1023))).decode()), "has 1025 bytes"),
        (with_(tpm2_blob_private=B64(b"\x01\x00x").decode()), "declares 256 bytes but holds 1"),
        (with_(tpm2_blob_private=DROP), "token has no 'tpm2-blob-private'"),
    ],
)
def test_refusals(token: dict[str, Any], error: str) -> None:
    for form in (token, json.dumps(token)):
        with pytest.raises(TokenError) as info:
            decode_token(form)
        assert error in str(info.value)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        ("\ud800", "not valid UTF-8"),
        (json.dumps(GOOD).encode("utf-16"), "not valid UTF-8"),
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[]", "token JSON is a list, not an object"),
        ("null", "token JSON is a NoneType, not an object"),
        ('{"type": NaN}', "contains NaN"),
        ('{"a": 1, "a": 2}', "has the key 'a' twice"),
        ("[" * 100000 + "]" * 100000, "exceeds 65536 bytes"),
        ("[" * 30000 + "]" * 30000, "nested too deeply"),
        ('{"n": ' + "9" * 5000 + "}", "not valid JSON"),
        (" " * (MAX_TOKEN_BYTES + 1), "exceeds 65536 bytes"),
        (b" " * (MAX_TOKEN_BYTES + 1), "exceeds 65536 bytes"),
        (json.dumps(GOOD).replace('"version": 1', '"version": 1.0'), "version 1.0 is not 1"),
    ],
)
def test_text_refusals(text: str | bytes, error: str) -> None:
    with pytest.raises(TokenError, match=None) as info:
        decode_token(text)
    assert error in str(info.value)


def test_unknown_keys_tolerated() -> None:
    token = {**GOOD, "x-future": {"anything": [1, 2]}}
    assert decode_token(json.dumps(token)) == (KEY, 1)


def test_encode_refuses_what_decode_would() -> None:
    with pytest.raises(TokenError, match="keyslot '32'"):
        encode_token(KEY, 32)
    with pytest.raises(TokenError, match="not an integer"):
        encode_token(KEY, "1")  # type: ignore[arg-type]
    with pytest.raises(TokenError, match="not the policy"):
        encode_token(SealedKey(**{**KEY.__dict__, "policy_hash": bytes(32)}), 1)
    with pytest.raises(TokenError, match="does not survive"):
        encode_token(SealedKey(**{**KEY.__dict__, "pcrs": (15, 7)}), 1)


def test_error_is_a_pystate_error() -> None:
    assert issubclass(TokenError, PystateError)


# ------------------------------------------------------------------ properties

keys = st.builds(
    lambda policy, private, bank, pcrs, pcr15: SealedKey(
        public=sealed_public(policy),
        private=tpm2b(private),
        bank=bank,
        pcrs=tuple(sorted(set(pcrs) | ({15} if pcr15 else set()))),
        policy_hash=policy,
        pcr15_zero=pcr15,
    ),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=1, max_size=1022),
    st.sampled_from(tpm2_policy.BANKS),
    st.sets(st.integers(0, 23), min_size=1, max_size=24),
    st.booleans(),
)


@given(keys, st.integers(0, 31))
def test_round_trip_property(key: SealedKey, slot: int) -> None:
    assert decode_token(encode_token_json(key, slot)) == (key, slot)
    assert decode_token(encode_token(key, slot)) == (key, slot)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=8,
)


def only_token_error(value: Any) -> None:
    with contextlib.suppress(TokenError):
        decode_token(value)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_only_token_error(value: Any) -> None:
    only_token_error(json.dumps(value))
    if isinstance(value, dict):
        only_token_error(value)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_token_error(data: bytes) -> None:
    only_token_error(data)


field_values = st.one_of(
    json_values,
    st.sampled_from(["1", "31", "sha1", "ecc", "pystate-tpm2", "AAA=", "", "AAE=", POLICY.hex()]),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(GOOD)), field_values, max_size=10))
def test_mutated_token_only_token_error(changes: dict[str, Any]) -> None:
    """Near misses: a good token with some fields replaced or removed."""
    token = {**GOOD, **changes}
    only_token_error(json.dumps(token))
    only_token_error(token)
    for name in changes:
        only_token_error({k: v for k, v in token.items() if k != name})


@settings(max_examples=200)
@given(st.data())
def test_truncated_and_flipped_text_only_token_error(data: st.DataObject) -> None:
    raw = bytearray(encode_token_json(KEY, 1).encode())
    cut = data.draw(st.integers(0, len(raw)))
    only_token_error(bytes(raw[:cut]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    only_token_error(bytes(raw))


# ------------------------------------------- the sealed PCR values and event summary

V7 = hashlib.sha256(b"pcr 7").digest()
EVENTS7 = (
    LoggedEvent(0x80000001, "SecureBoot", hashlib.sha256(b"sb").digest()),
    LoggedEvent(0x80000001, "db", hashlib.sha256(b"db").digest()),
    LoggedEvent(0x00000004, "", hashlib.sha256(b"sep").digest()),
)


def _replay(events: tuple[LoggedEvent, ...]) -> bytes:
    value = bytes(32)
    for e in events:
        value = hashlib.sha256(value + e.digest).digest()
    return value


R7 = _replay(EVENTS7)
POLICY_R7 = tpm2_policy.policy_pcr_digest("sha256", {7: R7, 15: bytes(32)})
KEY_V = SealedKey(
    public=sealed_public(POLICY_R7),
    private=tpm2b(bytes(range(158))),
    bank="sha256",
    pcrs=(7, 15),
    policy_hash=POLICY_R7,
    pcr15_zero=True,
    pcr_values=((7, R7),),
    pcr_logs=(PcrLog(7, 3, EVENTS7),),
)
GOOD_V = encode_token(KEY_V, 1)


def test_values_and_events_layout_and_round_trip() -> None:
    assert GOOD_V["pystate-pcr-values"] == {"7": R7.hex()}
    assert GOOD_V["pystate-pcr-events"] == {
        "7": {
            "count": 3,
            "events": [
                ["EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot", EVENTS7[0].digest.hex()],
                ["EV_EFI_VARIABLE_DRIVER_CONFIG", "db", EVENTS7[1].digest.hex()],
                ["EV_SEPARATOR", "", EVENTS7[2].digest.hex()],
            ],
        }
    }
    assert decode_token(json.dumps(GOOD_V)) == (KEY_V, 1)
    assert KEY_V.policy_values() == {7: R7, 15: bytes(32)}


def test_token_of_an_older_pystate_has_no_values() -> None:
    """Tokens written before issue 10 lack both fields: still usable, values None."""
    assert "pystate-pcr-values" not in GOOD
    key, _ = decode_token(json.dumps(GOOD))
    assert key.pcr_values is None and key.pcr_logs == ()
    old = {k: v for k, v in GOOD_V.items() if not k.startswith("pystate-pcr-")} | {
        "pystate-pcr15": True
    }
    assert decode_token(old)[0].pcr_values is None


def with_v(**changes: Any) -> dict[str, Any]:
    return with_(base=GOOD_V, **changes)


def events_with(**changes: Any) -> dict[str, Any]:
    return {"7": {**GOOD_V["pystate-pcr-events"]["7"], **changes}}


FORGED = hashlib.sha256(b"forged").hexdigest()
EV = GOOD_V["pystate-pcr-events"]["7"]["events"]


@pytest.mark.parametrize(
    ("token", "error"),
    [
        # A forged list must not mislead: the values reproduce the policy hash.
        (with_v(pystate_pcr_values={"7": FORGED}), "do not give tpm2-policy-hash"),
        (with_v(pystate_pcr_values={"7": R7.hex(), "15": "00" * 32}), "key '15' is not a measured"),
        (with_v(pystate_pcr_values={"07": R7.hex()}), "key '07'"),
        (with_v(pystate_pcr_values={"8": R7.hex()}), "key '8' is not a measured PCR of the policy"),
        (with_v(pystate_pcr_values={}), "lacks PCR 7"),
        (with_v(pystate_pcr_values={"7": R7.hex()[:40]}), "is not 64 lowercase hex digits"),
        (with_v(pystate_pcr_values={"7": R7.hex().upper()}), "is not 64 lowercase hex digits"),
        (with_v(pystate_pcr_values={"7": 7}), "is not 64 lowercase hex digits"),
        (with_v(pystate_pcr_values=[R7.hex()]), "pystate-pcr-values ['"),
        (with_v(pystate_pcr_values=DROP), "pystate-pcr-events without pystate-pcr-values"),
        (with_v(pystate_pcr_events=[]), "pystate-pcr-events [] is not an object"),
        (with_v(pystate_pcr_events={"8": EV}), "key '8'"),
        (with_v(pystate_pcr_events={"7": {"count": 3}}), "not an object of count and events"),
        (with_v(pystate_pcr_events=events_with(count=-1)), "count -1 is not 0-65536"),
        (with_v(pystate_pcr_events=events_with(count=True)), "count True"),
        (with_v(pystate_pcr_events=events_with(count=2)), "at most min(count, 16)"),
        (with_v(pystate_pcr_events=events_with(events=EV * 6, count=100)), "at most min(count"),
        (with_v(pystate_pcr_events=events_with(events=[EV[0][:2]])), "is not [type, name, digest]"),
        (
            with_v(pystate_pcr_events=events_with(events=[["EV_BOGUS", "", FORGED]])),
            "event type 'EV_BOGUS' is not an event type",
        ),
        (
            with_v(pystate_pcr_events=events_with(events=[["0x80000001", "", FORGED]])),
            "event type '0x80000001'",  # a known type spelled as a number: not what we write
        ),
        (
            with_v(pystate_pcr_events=events_with(events=[[EV[0][0], "x\n", FORGED]])),
            "is not short printable ASCII",
        ),
        (
            with_v(pystate_pcr_events=events_with(events=[[EV[0][0], "é", FORGED]])),
            "is not short printable ASCII",
        ),
        (
            with_v(pystate_pcr_events=events_with(events=[[EV[0][0], "", FORGED[:10]]])),
            "digest '",
        ),
        # A complete list must replay to its sealed value: "db" cannot be swapped in.
        (
            with_v(pystate_pcr_events=events_with(events=[EV[0], [EV[1][0], "db", FORGED], EV[2]])),
            "do not replay to its sealed value",
        ),
        (
            with_v(pystate_pcr_events=events_with(events=[EV[0], EV[2], EV[1]])),
            "do not replay to its sealed value",
        ),
    ],
)
def test_value_refusals(token: dict[str, Any], error: str) -> None:
    for form in (token, json.dumps(token)):
        with pytest.raises(TokenError) as info:
            decode_token(form)
        assert error in str(info.value)
        assert "\n" not in str(info.value)


def test_truncated_event_list_is_not_replayed() -> None:
    """A summary the cap cut short (count > events) cannot be replayed, so it is kept."""
    token = with_v(pystate_pcr_events=events_with(count=40, events=EV[:2]))
    key, _ = decode_token(json.dumps(token))
    assert key.pcr_logs == (PcrLog(7, 40, EVENTS7[:2]),)
    assert not key.pcr_logs[0].complete


def test_only_pcr15_in_the_policy_records_no_values() -> None:
    policy = tpm2_policy.policy_pcr_digest("sha256", {15: bytes(32)})
    key = SealedKey(
        public=sealed_public(policy),
        private=tpm2b(b"x" * 40),
        bank="sha256",
        pcrs=(15,),
        policy_hash=policy,
        pcr15_zero=True,
        pcr_values=(),
    )
    token = encode_token(key, 0)
    assert token["pystate-pcr-values"] == {}
    assert decode_token(token) == (key, 0)


def test_biggest_summary_keeps_the_token_small() -> None:
    """The cap: the largest summary pystate writes (sha512, 32 events of the longest
    names) keeps the token JSON under 6 KiB; the LUKS2 JSON area is 12 KiB."""
    digest = bytes(64)
    name = "N" * tcg_eventlog.MAX_NAME
    events = tuple(LoggedEvent(0x80000003, name, digest) for _ in range(16))
    values = {7: bytes(64), 4: bytes(64)}
    log = tcg_eventlog.EventLog(
        ((0x000D, 64),),
        tuple(
            tcg_eventlog.Event(pcr, e.type, ((0x000D, e.digest),), b"\0" * 8)
            for pcr in (4, 7)
            for e in events
        ),
    )
    replayed = tcg_eventlog.replay(log, "sha512")
    values = {4: replayed[4], 7: replayed[7]}
    logs = pcr_diagnosis.summarize(log, "sha512", values)
    assert sum(len(p.events) for p in logs) <= pcr_diagnosis.MAX_EVENTS_RECORDED
    policy = tpm2_policy.policy_pcr_digest("sha512", {**values, 15: bytes(64)})
    key = SealedKey(
        public=sealed_public(policy),
        private=tpm2b(bytes(158)),
        bank="sha512",
        pcrs=(4, 7, 15),
        policy_hash=policy,
        pcr15_zero=True,
        pcr_values=tuple(sorted(values.items())),
        pcr_logs=logs,
    )
    text = encode_token_json(key, 0)
    assert len(text) < 6 * 1024
    assert decode_token(text) == (key, 0)
    assert logs[0].count == 16 and not logs[-1].complete  # the budget cut the second PCR


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(GOOD_V)), field_values, max_size=10))
def test_mutated_token_with_values_only_token_error(changes: dict[str, Any]) -> None:
    token = {**GOOD_V, **changes}
    only_token_error(json.dumps(token))
    only_token_error(token)


@settings(max_examples=200)
@given(st.data())
def test_truncated_and_flipped_values_only_token_error(data: st.DataObject) -> None:
    raw = bytearray(encode_token_json(KEY_V, 1).encode())
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    only_token_error(bytes(raw))
