"""The re-seal's journal: a power cut between any two of its header changes leaks no keyslot.

Pure: the `pystate-reseal` record (round trip, hostile records) and `next_action` (what a
boot may kill). Host: real cryptsetup on an image file and a real seal by swtpm; the
re-seal is cut after each of its steps by running only the steps before (`Reseal`'s
methods, in `reseal`'s order), then a boot's `finish_interrupted` runs: afterwards the
token opens a keyslot through the TPM, the recovery key still opens its keyslot, no
keyslot is left that nothing names, and a keyslot someone else added is never killed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import swtpm as swtpm_helper
import test_provision_host
from hypothesis import given
from hypothesis import strategies as st
from test_token import KEY, keys

from pystate_initrd.config import Config
from pystate_initrd.formats import luks2, recovery, reseal_record
from pystate_initrd.formats.reseal_record import Action, Plan, ResealRecord
from pystate_initrd.formats.token import TokenError, encode_token, usable_token
from pystate_initrd.initrd import reseal
from pystate_initrd.log import Log
from pystate_initrd.system import luks, tpm2

swtpm = swtpm_helper.swtpm
tpm = swtpm_helper.tpm
needs_swtpm = swtpm_helper.needs_swtpm
formatted = test_provision_host.formatted
SALT = "c2FsdHNhbHRzYWx0c2FsdHNhbHRzYWx0c2FsdHNhbHQ="

# --- the record (pure) ------------------------------------------------------------------------


@given(keys, st.integers(0, 31), st.none() | st.integers(0, 31), st.text(min_size=1, max_size=44))
def test_record_round_trips(key: Any, slot: int, retire: int | None, salt: str) -> None:
    if retire == slot:
        retire = None
    record = ResealRecord(slot, key, retire, salt if retire is not None else None)
    obj = json.loads(reseal_record.encode_record(record))
    assert obj["type"] == "pystate-reseal" and obj["keyslots"] == []  # names no keyslot
    assert reseal_record.decode_record(obj) == record


GOOD = json.loads(reseal_record.encode_record(ResealRecord(2, KEY, 0, SALT)))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"keyslots": ["2"]}, "names keyslots"),
        ({"version": 2}, "version"),
        ({"version": True}, "version"),
        ({"keyslot": 32}, "not a keyslot"),
        ({"keyslot": "2"}, "not a keyslot"),
        ({"keyslot": 3}, "names keyslot 2, not 3"),
        ({"retire": 2}, "adds and retires keyslot 2"),
        ({"retire": -1}, "not a keyslot"),
        ({"retire": None}, "retire-salt but no keyslot"),
        ({"retire-salt": ""}, "not a salt"),
        ({"retire-salt": 7}, "not a salt"),
        ({"token": {"type": "systemd-tpm2"}}, "is not a pystate-tpm2 token"),
        ({"token": {**encode_token(KEY, 2), "version": 9}}, "version"),
        ({"type": "pystate-tpm2"}, "is not 'pystate-reseal'"),
    ],
)
def test_hostile_records_are_refused(change: dict[str, Any], error: str) -> None:
    with pytest.raises(TokenError, match=error):
        reseal_record.decode_record({**GOOD, **change})
    for name in GOOD:
        with pytest.raises(TokenError, match=f"no '{name}'"):
            reseal_record.decode_record({k: v for k, v in GOOD.items() if k != name})


def test_records_lists_only_records_and_says_why_one_is_bad() -> None:
    found = reseal_record.records(
        {0: encode_token(KEY, 0), 3: GOOD, 4: {**GOOD, "keyslot": 40}, 5: {"type": "x"}}
    )
    assert [i for i, _ in found] == [3, 4]
    assert found[0][1] == ResealRecord(2, KEY, 0, SALT)
    assert isinstance(found[1][1], str) and "not a keyslot" in found[1][1]


# --- what a boot may do (pure) ----------------------------------------------------------------

RECORD = ResealRecord(2, KEY, 0, SALT)
RECOVERY = {1}


@pytest.mark.parametrize(
    ("keyslots", "named", "plan"),
    [
        # Cut before the add: nothing to prove, the old token still names 0.
        ({0: SALT, 1: "r"}, {0}, Plan(Action.DROP, None)),
        # Cut after the add: keyslot 2 is there, nobody names it: prove it, then retire 0.
        ({0: SALT, 1: "r", 2: "n"}, {0}, Plan(Action.PROVE, None)),
        ({0: SALT, 1: "r", 2: "n"}, set(), Plan(Action.PROVE, 0)),
        # Cut after the token moved: retire 0 (still the keyslot the record saw).
        ({0: SALT, 1: "r", 2: "n"}, {2}, Plan(Action.DROP, 0)),
        # ...but not a keyslot 0 made since (another salt), nor one a token names.
        ({0: "another", 1: "r", 2: "n"}, {2}, Plan(Action.DROP, None)),
        ({0: SALT, 1: "r", 2: "n"}, {0, 2}, Plan(Action.DROP, None)),
        # Cut after the retire: only the record is left.
        ({1: "r", 2: "n"}, {2}, Plan(Action.DROP, None)),
    ],
)
def test_next_action(keyslots: dict[int, str], named: set[int], plan: Plan) -> None:
    assert reseal_record.next_action(RECORD, keyslots, named, RECOVERY) == plan


@given(
    st.integers(0, 31),
    st.none() | st.integers(0, 31),
    st.dictionaries(st.integers(0, 31), st.sampled_from([SALT, "other", None])),
    st.sets(st.integers(0, 31)),
    st.sets(st.integers(0, 31), max_size=2),
)
def test_next_action_never_kills_what_is_not_provably_the_old_keyslot(
    slot: int, retire: int | None, keyslots: dict[int, str | None], named: set[int],
    protected: set[int],
) -> None:  # fmt: skip
    if retire == slot:
        retire = None
    record = ResealRecord(slot, KEY, retire, SALT if retire is not None else None)
    plan = reseal_record.next_action(record, keyslots, named, protected)
    if plan.retire is not None:
        assert plan.retire == retire and keyslots[retire] == SALT
        assert retire not in named and retire not in protected
        assert slot in keyslots  # only once the new keyslot exists
    if plan.action is Action.PROVE:
        assert slot in keyslots and slot not in named and slot not in protected


# --- a real re-seal, cut after each step --------------------------------------------------------

STEPS = ("seal", "write_record", "add_keyslot", "point_token", "retire_old", "remove_record")


def _cut_reseal(image: Path, key_text: str, tcti: str, done: int) -> reseal.Reseal:
    """A re-seal that ran its first `done` steps, then lost power (its secret gone)."""
    header = luks.read_header(image)
    old = usable_token(luks2.token_dicts(header.metadata))
    r = reseal.Reseal(Config(), str(image), recovery.recovery_passphrase(key_text), old, old[0],
                      tcti)  # fmt: skip
    for name in STEPS[:done]:
        getattr(r, name)()
    r.wipe()
    return r


def _assert_healthy(image: Path, key_text: str, tcti: str) -> int:
    """The token opens its keyslot by the TPM; the recovery key its own; no other keyslot."""
    header = luks.read_header(image)
    assert reseal_record.records(luks2.token_dicts(header.metadata)) == []
    _, sealed, slot = usable_token(luks2.token_dicts(header.metadata))
    luks.check_key(image, key=tpm2.unseal(sealed, tcti=tcti), key_slot=slot)
    passphrase = recovery.recovery_passphrase(key_text)
    luks.check_key(image, key=passphrase, key_slot=luks.RECOVERY_KEYSLOT)
    assert sorted(luks.keyslots(image)) == sorted({slot, luks.RECOVERY_KEYSLOT})
    return slot


@needs_swtpm
@pytest.mark.parametrize("done", range(len(STEPS) + 1))
def test_a_cut_after_any_step_leaks_no_keyslot(
    formatted: tuple[Path, bytes, str, str], done: int
) -> None:
    image, _, key_text, tcti = formatted
    assert sorted(luks.keyslots(image)) == [0, 1]
    _cut_reseal(image, key_text, tcti, done)
    finished = reseal.finish_interrupted(str(image), tcti, Log(kmsg_path="/nonexistent"))
    slot = _assert_healthy(image, key_text, tcti)
    # From the add on, the new keyslot is the one in use: the TPM sealed it, no new seal needed.
    assert slot == (2 if done >= 3 else 0)
    assert finished.adopted == (done == 3), finished  # only the cut right after the add
    assert len(finished.lines) == (0 if done in (0, 1, 6) else 1), finished


@needs_swtpm
def test_a_keyslot_added_by_someone_else_is_never_killed(
    formatted: tuple[Path, bytes, str, str],
) -> None:
    image, _, key_text, tcti = formatted
    r = _cut_reseal(image, key_text, tcti, 2)  # the record says "keyslot 2", then the cut
    assert r.record is not None and r.record.keyslot == 2
    # An administrator adds a passphrase; cryptsetup takes the first free keyslot: 2.
    passphrase = recovery.recovery_passphrase(key_text)
    luks.add_keyslot(image, existing_key=passphrase, existing_slot=1, new_key=b"admin" * 4, slot=2)
    finished = reseal.finish_interrupted(str(image), tcti, Log(kmsg_path="/nonexistent"))
    assert not finished.adopted and "left alone" in finished.lines[0]
    luks.check_key(image, key=b"admin" * 4, key_slot=2)  # still there, still opens
    luks.check_key(image, key=passphrase, key_slot=1)
    header = luks.read_header(image)
    assert reseal_record.records(luks2.token_dicts(header.metadata)) == []
    _, sealed, slot = usable_token(luks2.token_dicts(header.metadata))
    assert slot == 0  # the old TPM keyslot still in use
    luks.check_key(image, key=tpm2.unseal(sealed, tcti=tcti), key_slot=0)


@needs_swtpm
def test_an_unusable_record_is_removed_and_nothing_else_changes(
    formatted: tuple[Path, bytes, str, str],
) -> None:
    image, _, key_text, tcti = formatted
    before = sorted(luks.keyslots(image))
    luks.token_import(image, json.dumps({**GOOD, "retire": 1, "retire-salt": "x" * 300}))
    finished = reseal.finish_interrupted(str(image), tcti, Log(kmsg_path="/nonexistent"))
    assert "not a salt" in finished.lines[0] and not finished.adopted
    assert sorted(luks.keyslots(image)) == before
    _assert_healthy(image, key_text, tcti)


@needs_swtpm
def test_a_whole_reseal_leaves_no_record(formatted: tuple[Path, bytes, str, str]) -> None:
    image, _, key_text, tcti = formatted
    header = luks.read_header(image)
    old = usable_token(luks2.token_dicts(header.metadata))
    passphrase = recovery.recovery_passphrase(key_text)
    detail = reseal.reseal(reseal.Reseal(Config(), str(image), passphrase, old, old[0], tcti))
    assert detail.startswith("keyslot 2 sealed to sha256:")
    assert _assert_healthy(image, key_text, tcti) == 2
    assert not reseal.has_records(luks.read_header(image))
