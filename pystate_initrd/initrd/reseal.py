"""The re-seal after a recovery unlock, journaled so that a power cut leaks no keyslot.

`reseal` seals a new secret to the current PCRs and moves the TPM keyslot to it, one
header change per step (`Reseal`'s methods, in order): write the journal record
(formats/reseal_record.py), add the new keyslot, point the `pystate-tpm2` token at it,
kill the old keyslot, remove the record. Stopped anywhere, the image opens with the
old token or the new one or the recovery key, and the next boot that opens it
(`finish_interrupted`) completes or tidies what the record describes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from pystate_initrd.config import Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import luks2, reseal_record, tpm2_policy
from pystate_initrd.formats.reseal_record import Action, ResealRecord
from pystate_initrd.formats.token import encode_token_json, pystate_tokens
from pystate_initrd.secret import Secret
from pystate_initrd.system import luks, tpm2
from pystate_initrd.volume import binding, hooks


class ResealError(PystateError):
    """The TPM keyslot could not be moved (the recovery key still opens the image)."""


def free_slot(header: luks2.Luks2Header) -> int:
    used = luks2.keyslot_infos(header.metadata)
    for slot in range(luks2.MAX_KEYSLOTS):
        if slot not in used and slot != luks.RECOVERY_KEYSLOT:
            return slot
    raise ResealError("encrypted.img has no free keyslot for the new TPM2 seal")


class Reseal:
    """One re-seal of `device`; each method is one step, each header change its own."""

    def __init__(
        self,
        cfg: Config,
        device: str,
        recovery_pass: bytearray,
        old: tuple[int, tpm2_policy.SealedKey, int] | None,
        token_id: int | None,
        tcti: str | None,
    ) -> None:
        self.cfg, self.device, self.recovery_pass, self.tcti = cfg, device, recovery_pass, tcti
        self.token_id = token_id
        self.old_slot = old[2] if old is not None else None
        self.secret: Secret | None = None
        self.record: ResealRecord | None = None
        self.record_id: int | None = None

    def seal(self) -> None:
        self.secret = Secret.random(32)
        sealed = binding.seal(self.cfg, self.secret.value, self.tcti)
        header = luks.read_header(self.device)
        slot = free_slot(header)
        infos = luks2.keyslot_infos(header.metadata)
        retire = self.old_slot
        if retire in (None, slot, luks.RECOVERY_KEYSLOT) or retire not in infos:
            retire = None
        salt = infos[retire].salt if retire is not None else None
        if salt is None:
            retire = None
        self.record = ResealRecord(slot, sealed, retire, salt)

    def write_record(self) -> None:
        assert self.record is not None
        text = reseal_record.encode_record(self.record)
        self.record_id = luks.token_import(self.device, text)

    def add_keyslot(self) -> None:
        assert self.record is not None and self.secret is not None
        luks.add_keyslot(
            self.device,
            existing_key=self.recovery_pass,
            existing_slot=luks.RECOVERY_KEYSLOT,
            new_key=self.secret.value,
            slot=self.record.keyslot,
        )
        self.secret.wipe()

    def point_token(self) -> None:
        assert self.record is not None
        text = encode_token_json(self.record.sealed, self.record.keyslot)
        luks.token_import(self.device, text, self.token_id, replace=self.token_id is not None)

    def retire_old(self) -> None:
        assert self.record is not None
        if self.record.retire is not None:
            with contextlib.suppress(luks.NoKeyslot):
                luks.kill_keyslot(self.device, self.record.retire)

    def remove_record(self) -> None:
        assert self.record_id is not None
        luks.token_remove(self.device, self.record_id)

    def wipe(self) -> None:
        if self.secret is not None:
            self.secret.wipe()


def reseal(r: Reseal, hook: hooks.Hook = hooks.no_hook) -> str:
    """Run every step of `r`: a new secret sealed to the current PCRs in a new keyslot, the
    old keyslot retired. `hook` is called after each step with ``reseal-<step>`` (a test
    build cuts the power there: volume/hooks.py)."""
    try:
        for step in (r.seal, r.write_record, r.add_keyslot, r.point_token, r.retire_old,
                     r.remove_record):  # fmt: skip
            step()
            hook("reseal-" + step.__name__.replace("_", "-"))
    finally:
        r.wipe()
    assert r.record is not None
    return f"keyslot {r.record.keyslot} sealed to {r.record.sealed.pcr_spec}"


# --- a boot after a cut ---------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    lines: tuple[str, ...]  # what was done, one line each (the boot report's detail)
    adopted: bool  # a new TPM keyslot sealed to the current PCRs is now in use


def has_records(header: luks2.Luks2Header) -> bool:
    """Cheap: any re-seal record in the header (no process)."""
    return bool(reseal_record.records(luks2.token_dicts(header.metadata)))


def finish_interrupted(device: str, tcti: str | None, log: Any) -> Finished:
    """Complete or tidy every re-seal record of the opened image's header.

    Must run before PCR 15 is extended: the proof unseals the record's blob, which
    was sealed to PCR 15 = zero like every pystate key.
    """
    lines: list[str] = []
    adopted = False
    header = luks.read_header(device)
    for record_id, record in reseal_record.records(luks2.token_dicts(header.metadata)):
        if isinstance(record, str):
            # Not a record pystate writes: it proves nothing and opens nothing.
            luks.token_remove(device, record_id)
            lines.append(f"removed token {record_id}: {record}")
            log.warning(f"removed an unusable re-seal record (token {record_id}): {record}")
            continue
        line, done = _finish_one(device, record_id, record, tcti, log)
        adopted = adopted or done
        lines.append(line)
    return Finished(tuple(lines), adopted)


def _state(device: str) -> tuple[luks2.Luks2Header, dict[int, str | None], set[int]]:
    header = luks.read_header(device)
    salts = {n: info.salt for n, info in luks2.keyslot_infos(header.metadata).items()}
    named = {int(s) for t in luks2.token_dicts(header.metadata).values()
             for s in t.get("keyslots", []) if isinstance(s, str) and s.isdigit()}  # fmt: skip
    return header, salts, named


def _finish_one(
    device: str, record_id: int, record: ResealRecord, tcti: str | None, log: Any
) -> tuple[str, bool]:
    header, salts, named = _state(device)
    plan = reseal_record.next_action(record, salts, named, {luks.RECOVERY_KEYSLOT})
    n = record.keyslot
    if plan.action is Action.PROVE:
        try:
            with Secret(tpm2.unseal(record.sealed, tcti=tcti)) as secret:
                luks.check_key(device, key=secret.value, key_slot=n)
        except (tpm2.PcrMismatch, tpm2.BadBlob, luks.BadKey) as exc:
            # Never provable again: leave the keyslot (it may be someone's), drop the record.
            luks.token_remove(device, record_id)
            log.warning(
                f"keyslot {n} was added by a re-seal that was cut off, or by someone else; "
                f"pystate cannot prove it its own ({exc}) and leaves it: if it is not yours, "
                f"'cryptsetup luksKillSlot IMAGE {n}' frees it"
            )
            return f"keyslot {n} left alone (not provably pystate's), record removed", False
        except tpm2.Tpm2Error as exc:  # no TPM, busy: try again at the next boot
            return f"keyslot {n} not proven yet ({exc}); record kept", False
        # Proven: the record's token now names it, in place of the token of the old keyslot.
        tokens = pystate_tokens(luks2.token_dicts(header.metadata))
        old = next((t.token_id for t in tokens if t.keyslot == record.retire), None)
        if old is None and tokens:
            old = tokens[0].token_id
        text = encode_token_json(record.sealed, n)
        luks.token_import(device, text, old, replace=old is not None)
        header, salts, named = _state(device)
        plan = reseal_record.next_action(record, salts, named, {luks.RECOVERY_KEYSLOT})
        line, adopted = f"keyslot {n} proven and named by the token", True
    else:
        line, adopted = ("finished" if n in salts else "nothing was added"), False
    if plan.retire is not None:
        with contextlib.suppress(luks.NoKeyslot):
            luks.kill_keyslot(device, plan.retire)
        line += f"; old keyslot {plan.retire} killed"
    luks.token_remove(device, record_id)
    log.info(f"re-seal cut off earlier: {line}")
    return line + "; record removed", adopted
