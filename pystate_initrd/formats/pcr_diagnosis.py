"""Why the TPM refuses a sealed key, and whether it will unseal at the next boot (pure).

The token records the PCR values the key was sealed to and a summary of the firmware
events that produced them (``summarize``, at sealing). ``compare`` sets them against the
PCRs read now and the firmware's event log now; ``mismatch_line`` is the one line the
console shows when unsealing failed, ``status_line`` what ``pystate status`` says.

PCR 15 (the volume measurement, SPEC §5) is sealed as zero and extended after every
unlock. When the initrd is about to unseal (``Moment.UNLOCK``) it must still be zero:
anything else means something extended it first. In the booted system
(``Moment.NEXT_BOOT``) it is extended, as it should be, and is reset at reboot: it is
not compared.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pystate_initrd.formats import tcg_eventlog
from pystate_initrd.formats.tpm2_policy import (
    PCR_VOLUME,
    LoggedEvent,
    PcrLog,
    SealedKey,
    bank_alg_id,
    bank_digest_size,
    extend_value,
)

# The token keeps at most this many events per PCR, and stops recording once the events
# would take more than EVENT_BUDGET bytes of JSON (the LUKS2 JSON area is 12 KiB with
# cryptsetup's default 16 KiB header, and holds the keyslots too): a typical PCR 7
# (SecureBoot, PK, KEK, db, dbx, separator, a few authorities) fits whole.
MAX_EVENTS_PER_PCR = 16
MAX_EVENTS_RECORDED = 32
EVENT_BUDGET = 3072
MAX_COMPARED = 256  # events of one PCR in the current log compared with the recorded ones
MAX_DIFFS_SHOWN = 3
HEX_SHOWN = 8  # hex digits of a PCR value in a message


class Moment(enum.Enum):
    UNLOCK = "unlock"  # in the initrd, before PCR 15 is extended
    NEXT_BOOT = "next-boot"  # in the booted system: would the next boot unseal?


def event_json_size(bank: str, event: LoggedEvent) -> int:
    """Bytes `["TYPE","name","digest"],` takes in the token's compact JSON (names are
    printable ASCII, so no escapes but quote and backslash)."""
    name = event.name.replace("\\", "\\\\").replace('"', '\\"')
    kind = tcg_eventlog.event_type_name(event.type)
    return len(kind) + len(name) + 2 * bank_digest_size(bank) + 12


def summarize(
    log: tcg_eventlog.EventLog, bank: str, values: Mapping[int, bytes]
) -> tuple[PcrLog, ...]:
    """The events of each PCR in `values` whose log replay gives exactly that value (a
    log that does not describe this TPM is not recorded), capped as described above."""
    try:
        replayed = tcg_eventlog.replay(log, bank)
    except tcg_eventlog.EventLogError:
        return ()
    alg = bank_alg_id(bank)
    budget, total = EVENT_BUDGET, 0
    logs = []
    for pcr in sorted(values):
        if replayed.get(pcr) != values[pcr]:
            continue
        if tcg_eventlog.initial_value(log, bank, pcr) != bytes(bank_digest_size(bank)):
            continue  # PCR 0 after a locality-3/4 start: the summary could not be checked
        events = tcg_eventlog.extended(log, pcr)
        kept: list[LoggedEvent] = []
        for e in events[:MAX_EVENTS_PER_PCR]:
            digest = e.digest(alg)
            assert digest is not None  # replay checked every extended event has one
            entry = LoggedEvent(e.type, tcg_eventlog.event_name(e), digest)
            size = event_json_size(bank, entry)
            if size > budget or total >= MAX_EVENTS_RECORDED:
                break
            budget -= size
            total += 1
            kept.append(entry)
        logs.append(PcrLog(pcr, len(events), tuple(kept)))
    return tuple(logs)


def replay_summary(bank: str, pcr_log: PcrLog) -> bytes:
    """The PCR value a complete summary stands for (from zero)."""
    value = bytes(bank_digest_size(bank))
    for e in pcr_log.events:
        value = extend_value(bank, value, e.digest)
    return value


# ------------------------------------------------------------------------------ compare


@dataclass(frozen=True)
class PcrChange:
    pcr: int
    sealed: bytes
    now: bytes
    events: str  # what the event logs say about it, "" when nothing


@dataclass(frozen=True)
class PcrCheck:
    """The sealed PCRs against the current ones."""

    spec: str  # sha256:7,15
    recorded: bool  # the token holds the sealed values
    compared: tuple[int, ...]  # PCRs compared
    changed: tuple[PcrChange, ...]
    current: Mapping[int, bytes] = field(default_factory=dict)

    @property
    def unchanged(self) -> tuple[int, ...]:
        moved = {c.pcr for c in self.changed}
        return tuple(i for i in self.compared if i not in moved)

    def to_json(self) -> dict[str, Any]:
        return {
            "pcrs": self.spec,
            "recorded": self.recorded,
            "compared": list(self.compared),
            "changed": [
                {"pcr": c.pcr, "sealed": c.sealed.hex(), "now": c.now.hex(), "events": c.events}
                for c in self.changed
            ],
            "current": {str(i): v.hex() for i, v in sorted(self.current.items())},
        }


def _short(value: bytes) -> str:
    return value.hex()[:HEX_SHOWN] + "…"


def _entry(e: tcg_eventlog.Event, alg: int) -> LoggedEvent:
    return LoggedEvent(e.type, tcg_eventlog.event_name(e), e.digest(alg) or b"")


def _describe(e: LoggedEvent) -> str:
    return tcg_eventlog.describe(e.type, e.name)


def event_diff(
    bank: str,
    pcr: int,
    recorded: PcrLog | None,
    log: tcg_eventlog.EventLog | None,
    now: bytes,
    log_error: str = "",
) -> str:
    """Which firmware events of `pcr` differ between sealing and now, in a few words."""
    if recorded is None:
        return "not recorded at sealing"
    if log is None:
        return f"unreadable now ({log_error})" if log_error else "none now"
    try:
        replayed = tcg_eventlog.replay(log, bank).get(pcr, bytes(bank_digest_size(bank)))
    except tcg_eventlog.EventLogError as exc:
        return f"unusable now ({exc})"
    if replayed != now:
        return f"does not match the TPM's PCR {pcr} now"
    alg = bank_alg_id(bank)
    current = [_entry(e, alg) for e in tcg_eventlog.extended(log, pcr)[:MAX_COMPARED]]
    kept = len(recorded.events)
    if not recorded.complete:
        current = current[:kept]
    diffs: list[str] = []
    import difflib  # here, not at the top: only a failed unseal is diagnosed (1.5 ms)

    matcher = difflib.SequenceMatcher(None, list(recorded.events), current, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            continue
        olds, news = recorded.events[a0:a1], current[b0:b1]
        for old, new in zip(olds, news, strict=False):
            if (old.type, old.name) == (new.type, new.name):
                diffs.append(f"{_describe(old)} differs")
            else:
                diffs.append(f"{_describe(old)} replaced by {_describe(new)}")
        diffs += [f"{_describe(e)} missing" for e in olds[len(news) :]]
        diffs += [f"{_describe(e)} added" for e in news[len(olds) :]]
    if not diffs:
        if not recorded.complete:
            return (
                f"the first {kept} of {recorded.count} events are unchanged, a later one "
                f"differs (only {kept} recorded)"
            )
        return "no differing event found"
    more = len(diffs) - MAX_DIFFS_SHOWN
    return ", ".join(diffs[:MAX_DIFFS_SHOWN]) + (f" and {more} more" if more > 0 else "")


def compare(
    key: SealedKey,
    current: Mapping[int, bytes],
    log: tcg_eventlog.EventLog | None,
    moment: Moment,
    log_error: str = "",
) -> PcrCheck:
    """The PCRs of the key's policy that differ now from their sealed values.

    `current` holds the values read now of ``compare_pcrs(key, moment)``.
    """
    pcrs = compare_pcrs(key, moment)
    sealed = key.policy_values()
    logs = {p.pcr: p for p in key.pcr_logs}
    changed = []
    if sealed is not None:
        for i in pcrs:
            if current[i] != sealed[i]:
                # No summary at all (no event log at sealing): nothing to say about events.
                events = (
                    event_diff(key.bank, i, logs.get(i), log, current[i], log_error)
                    if key.pcr_logs and not (i == PCR_VOLUME and key.pcr15_zero)
                    else ""
                )
                changed.append(PcrChange(i, sealed[i], current[i], events))
    return PcrCheck(key.pcr_spec, sealed is not None, pcrs, tuple(changed), dict(current))


def compare_pcrs(key: SealedKey, moment: Moment) -> tuple[int, ...]:
    """The policy's PCRs worth reading: all at unlock; without PCR 15 = zero for the next
    boot (it is reset at reboot, then zero when the initrd unseals)."""
    if moment is Moment.NEXT_BOOT:
        return key.measured_pcrs
    return key.pcrs


def _change_text(c: PcrChange, key_pcr15: bool) -> str:
    if c.pcr == PCR_VOLUME and key_pcr15:
        return (
            f"PCR {c.pcr} is not zero (now {_short(c.now)}): something extended it before "
            "pystate unlocked"
        )
    text = f"PCR {c.pcr} changed since sealing (sealed {_short(c.sealed)}, now {_short(c.now)})"
    return text + (f"; firmware event log: {c.events}" if c.events else "")


def mismatch_line(key: SealedKey, check: PcrCheck) -> str:
    """The console line after a PcrMismatch, e.g. `TPM2 refused the key: PCR 7 changed
    since sealing (sealed 3d45…, now 9a1c…); firmware event log: EV_… "db" differs`."""
    head = f"TPM2 refused the key sealed to {check.spec}"
    if not check.recorded:
        now = ", ".join(f"PCR {i} now {_short(v)}" for i, v in sorted(check.current.items()))
        return f"{head}: sealed values not recorded (token from an older pystate); {now}"
    if not check.changed:
        return (
            f"{head}, but PCRs {','.join(map(str, check.compared))} hold their sealed values "
            "now (changed and back, or sealed by another TPM?)"
        )
    return f"{head}: " + "; ".join(_change_text(c, key.pcr15_zero) for c in check.changed)


def status_line(key: SealedKey, check: PcrCheck) -> str:
    """`pystate status`' verdict: will the TPM unseal at the next boot?"""
    head = f"TPM2: sealed to {check.spec}"
    if not check.recorded:
        return (
            f"{head}; sealed values not recorded (token from an older pystate): cannot tell "
            "whether the next boot unseals"
        )
    note = f" (PCR {PCR_VOLUME} is reset at reboot)" if key.pcr15_zero else ""
    if not check.changed:
        if not check.compared:
            return f"{head}: the TPM will unseal at the next boot{note}"
        pcrs = ", ".join(map(str, check.compared))
        return (
            f"{head}; PCR {pcrs} unchanged since sealing: the TPM will unseal at the next boot "
            f"if nothing else changes{note}"
        )
    changes = "; ".join(
        f"PCR {c.pcr} changed (sealed {_short(c.sealed)}, now {_short(c.now)}"
        + (f"; firmware event log: {c.events})" if c.events else ")")
        for c in check.changed
    )
    return f"{head}; {changes}: the next boot will ask for the recovery key"
