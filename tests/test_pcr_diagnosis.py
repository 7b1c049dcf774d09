"""Issue 10: which PCR changed, which firmware event changed it, and will the next boot unseal.

Real tpm2-tools against a real swtpm: the "firmware" is a generated crypto-agile event
log whose digests are extended into swtpm's PCRs (the replay property in
test_eventlog.py shows the two agree), written to a file that stands for
/sys/kernel/security/tpm0/binary_bios_measurements.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import swtpm as swtpm_helper
from conftest import needs_root
from test_eventlog import ALGS, SECURITY_DB, secure_boot_events, variable

from pystate_initrd.booted import status
from pystate_initrd.config import Config
from pystate_initrd.formats import pcr_diagnosis, recovery, tcg_eventlog, tpm2_policy
from pystate_initrd.formats.pcr_diagnosis import Moment
from pystate_initrd.formats.tcg_eventlog import Event
from pystate_initrd.formats.token import decode_token, encode_token, usable_token
from pystate_initrd.formats.tpm2_policy import LoggedEvent, PcrLog, SealedKey
from pystate_initrd.initrd import provision, unlock
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.secret import Secret, new_recovery_key
from pystate_initrd.system import luks, tpm2
from pystate_initrd.volume import binding

pytestmark = swtpm_helper.needs_swtpm
swtpm = swtpm_helper.swtpm
tpm = swtpm_helper.tpm
SECRET = bytes(range(1, 33))
DB_DIFFERS = 'EV_EFI_VARIABLE_DRIVER_CONFIG "db" differs'


def firmware(tcti: str, events: list[Event], log: Path) -> None:
    """Measure `events` as firmware would: extend their digests, publish the log."""
    names = {0x0004: "sha1", 0x000B: "sha256"}
    for e in events:
        for alg, digest in e.digests:
            tpm2.pcr_extend(e.pcr, names[alg], digest, tcti)
    log.write_bytes(tcg_eventlog.encode(ALGS, events))


def short(value: bytes) -> str:
    return value.hex()[:8] + "…"


def seal7(tcti: str, log: Path | str) -> SealedKey:
    key = tpm2.seal(SECRET, pcrs=[7], bank="sha256", pcr15_zero=True, tcti=tcti, event_log=log)
    token = encode_token(key, 0)  # what the header holds, decoded as the initrd does
    return decode_token(json.dumps(token))[0]


def test_seal_records_values_and_event_summary(tpm: swtpm_helper.Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "binary_bios_measurements"
    firmware(tpm.tcti, secure_boot_events(), log)
    key = seal7(tpm.tcti, log)
    v7 = tpm2.pcr_read("sha256", [7], tpm.tcti)[7]
    assert key.pcr_values == ((7, v7),)
    assert tpm2_policy.policy_pcr_digest("sha256", key.policy_values() or {}) == key.policy_hash
    (summary,) = key.pcr_logs
    assert summary.complete and summary.count == 7
    assert [(tcg_eventlog.event_type_name(e.type), e.name) for e in summary.events] == [
        ("EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot"),
        ("EV_EFI_VARIABLE_DRIVER_CONFIG", "PK"),
        ("EV_EFI_VARIABLE_DRIVER_CONFIG", "KEK"),
        ("EV_EFI_VARIABLE_DRIVER_CONFIG", "db"),
        ("EV_EFI_VARIABLE_DRIVER_CONFIG", "dbx"),
        ("EV_SEPARATOR", ""),
        ("EV_EFI_VARIABLE_AUTHORITY", "db"),
    ]
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET


def test_seal_without_a_matching_log_records_values_only(
    tpm: swtpm_helper.Swtpm, tmp_path: Path
) -> None:
    """No log, a log of another machine, a broken log: the seal works, no summary."""
    firmware(tpm.tcti, secure_boot_events(), tmp_path / "real")
    foreign = tmp_path / "foreign"
    foreign.write_bytes(tcg_eventlog.encode(ALGS, secure_boot_events(db=b"other")))
    broken = tmp_path / "broken"
    broken.write_bytes(b"\0" * 100)
    for log in (tmp_path / "absent", foreign, broken, tmp_path):
        key = seal7(tpm.tcti, log)
        assert key.pcr_values is not None and key.pcr_logs == ()
        assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET


def test_changed_db_names_pcr7_old_and_new_values_and_the_event(
    tpm: swtpm_helper.Swtpm, tmp_path: Path
) -> None:
    log = tmp_path / "binary_bios_measurements"
    firmware(tpm.tcti, secure_boot_events(), log)
    key = seal7(tpm.tcti, log)
    sealed7 = dict(key.pcr_values or ())[7]
    tpm.restart()  # reboot, with a new db
    firmware(tpm.tcti, secure_boot_events(db=b"db-certs + one more"), log)
    now7 = tpm2.pcr_read("sha256", [7], tpm.tcti)[7]
    with pytest.raises(tpm2.PcrMismatch):
        tpm2.unseal(key, tcti=tpm.tcti)
    line, record = binding.diagnose_mismatch(key, tpm.tcti, str(log))
    assert line == (
        f"TPM2 refused the key sealed to sha256:7,15: PCR 7 changed since sealing "
        f"(sealed {short(sealed7)}, now {short(now7)}); firmware event log: {DB_DIFFERS}"
    )
    assert record["changed"] == [
        {"pcr": 7, "sealed": sealed7.hex(), "now": now7.hex(), "events": DB_DIFFERS}
    ]
    # Without the log now, the values still say it.
    line, _ = binding.diagnose_mismatch(key, tpm.tcti, str(tmp_path / "gone"))
    assert line.endswith(f"now {short(now7)}); firmware event log: none now")
    line, _ = binding.diagnose_mismatch(key, tpm.tcti, str(tmp_path))  # a directory
    assert "firmware event log: unreadable now (cannot read" in line


@pytest.mark.parametrize(
    ("events", "diff"),
    [
        # Secure Boot turned off, a dbx update, an extra authority, a missing one:
        (
            [{"SecureBoot": b"\x00"}],
            'EV_EFI_VARIABLE_DRIVER_CONFIG "SecureBoot" differs',
        ),
        (
            [{"dbx": b"dbx-hashes + new revocations"}],
            'EV_EFI_VARIABLE_DRIVER_CONFIG "dbx" differs',
        ),
        ([{"+": b"shim cert"}], 'EV_EFI_VARIABLE_AUTHORITY "MokListRT" added'),
        ([{"-": b""}], 'EV_EFI_VARIABLE_AUTHORITY "db" missing'),
    ],
)
def test_event_diffs(
    tpm: swtpm_helper.Swtpm, tmp_path: Path, events: list[dict[str, bytes]], diff: str
) -> None:
    log = tmp_path / "log"
    firmware(tpm.tcti, secure_boot_events(), log)
    key = seal7(tpm.tcti, log)
    tpm.restart()
    changed = secure_boot_events()
    for change in events:
        for name, value in change.items():
            if name == "+":
                changed.append(
                    _variable(7, tcg_eventlog.EV_EFI_VARIABLE_AUTHORITY, "MokListRT", value)
                )
            elif name == "-":
                changed.pop()
            else:
                i = next(k for k, e in enumerate(changed) if tcg_eventlog.event_name(e) == name)
                changed[i] = _variable(7, changed[i].type, name, value)
    firmware(tpm.tcti, changed, log)
    line, _ = binding.diagnose_mismatch(key, tpm.tcti, str(log))
    assert line.endswith(f"firmware event log: {diff}"), line


def _variable(pcr: int, kind: int, name: str, value: bytes) -> Event:
    return variable(pcr, kind, SECURITY_DB, name, value)


def test_pcr7_extended_by_hand_without_any_event_log(
    tpm: swtpm_helper.Swtpm, tmp_path: Path
) -> None:
    key = seal7(tpm.tcti, tmp_path / "none")
    sealed7 = dict(key.pcr_values or ())[7]
    tpm2.pcr_extend(7, "sha256", bytes(range(32)), tpm.tcti)
    now7 = tpm2.pcr_read("sha256", [7], tpm.tcti)[7]
    with pytest.raises(tpm2.PcrMismatch):
        tpm2.unseal(key, tcti=tpm.tcti)
    line, _ = binding.diagnose_mismatch(key, tpm.tcti, str(tmp_path / "none"))
    assert line == (
        f"TPM2 refused the key sealed to sha256:7,15: PCR 7 changed since sealing "
        f"(sealed {short(sealed7)}, now {short(now7)})"
    )


def test_pcr15_extended_before_unlock_is_named(tpm: swtpm_helper.Swtpm, tmp_path: Path) -> None:
    key = seal7(tpm.tcti, tmp_path / "none")
    tpm2.pcr_extend(15, "sha256", bytes(32), tpm.tcti)
    with pytest.raises(tpm2.PcrMismatch):
        tpm2.unseal(key, tcti=tpm.tcti)
    line, record = binding.diagnose_mismatch(key, tpm.tcti, None)
    assert "PCR 15 is not zero (now " in line and "something extended it before pystate" in line
    assert "PCR 7" not in line
    assert [c["pcr"] for c in record["changed"]] == [15]


def old_token_key(key: SealedKey) -> SealedKey:
    """The key as a token written by pystate before issue 10 gives it."""
    token = {k: v for k, v in encode_token(key, 0).items() if not k.startswith("pystate-pcr-")}
    token["pystate-pcr15"] = key.pcr15_zero
    return decode_token(token)[0]


def test_old_token_still_unlocks_and_says_values_not_recorded(
    tpm: swtpm_helper.Swtpm, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    firmware(tpm.tcti, secure_boot_events(), log)
    old = old_token_key(seal7(tpm.tcti, log))
    assert old.pcr_values is None and old.pcr_logs == ()
    assert tpm2.unseal(old, tcti=tpm.tcti) == SECRET
    view = status.next_boot(old, tpm.tcti, str(log))
    assert view["unseal"] is None
    assert view["line"] == (
        "TPM2: sealed to sha256:7,15; sealed values not recorded (token from an older "
        "pystate): cannot tell whether the next boot unseals"
    )
    tpm2.pcr_extend(7, "sha256", bytes(32), tpm.tcti)
    now7 = tpm2.pcr_read("sha256", [7], tpm.tcti)[7]
    line, record = binding.diagnose_mismatch(old, tpm.tcti, str(log))
    assert line == (
        "TPM2 refused the key sealed to sha256:7,15: sealed values not recorded (token from "
        f"an older pystate); PCR 7 now {short(now7)}"
    )
    assert record["recorded"] is False


def test_status_says_whether_the_next_boot_unseals(tpm: swtpm_helper.Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "log"
    firmware(tpm.tcti, secure_boot_events(), log)
    key = seal7(tpm.tcti, log)
    will = (
        "TPM2: sealed to sha256:7,15; PCR 7 unchanged since sealing: the TPM will unseal at "
        "the next boot if nothing else changes (PCR 15 is reset at reboot)"
    )
    assert status.next_boot(key, tpm.tcti, str(log)) | {"current": None} == {
        "unseal": True, "line": will, "pcrs": "sha256:7,15", "recorded": True,
        "compared": [7], "changed": [], "current": None,
    }  # fmt: skip
    # After the unlock, PCR 15 holds the volume measurement: not a reason to fail.
    binding.extend_pcr15(os.urandom(64), "12345678-1234-1234-1234-123456789abc", "sha256", tpm.tcti)
    assert status.next_boot(key, tpm.tcti, str(log))["line"] == will
    # The proof: a reboot with the same firmware unseals.
    tpm.restart()
    firmware(tpm.tcti, secure_boot_events(), log)
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET
    # A db update before the reboot: status warns.
    tpm.restart()
    firmware(tpm.tcti, secure_boot_events(db=b"new db"), log)
    view = status.next_boot(key, tpm.tcti, str(log))
    assert view["unseal"] is False
    assert view["line"].startswith("TPM2: sealed to sha256:7,15; PCR 7 changed (sealed ")
    assert view["line"].endswith(
        f"; firmware event log: {DB_DIFFERS}): the next boot will ask for the recovery key"
    )
    no_tpm = status.next_boot(key, "device:/dev/nonexistent-tpm", str(log))
    assert no_tpm["unseal"] is None
    assert no_tpm["line"].startswith("TPM2: sealed to sha256:7,15; cannot read the PCRs now: ")


def test_diagnosis_never_raises() -> None:
    """On the way to the recovery prompt: no TPM, no tools, a bug — a shorter line."""
    key = SealedKey(
        public=b"\0\x01x",
        private=b"\0\x01x",
        bank="sha256",
        pcrs=(7, 15),
        policy_hash=bytes(32),
        pcr15_zero=True,
        pcr_values=((7, bytes(32)),),
        pcr_logs=(PcrLog(7, 1, (LoggedEvent(4, "", bytes(32)),)),),
    )
    line, record = binding.diagnose_mismatch(key, "device:/dev/nonexistent-tpm", None)
    assert line.startswith("TPM2 refused the key sealed to sha256:7,15; cannot say which PCR")
    assert "no TPM2 on device:/dev/nonexistent-tpm" in line and "error" in record
    broken = SealedKey(**{**key.__dict__, "pcr_values": ((7, b"short"),)})
    line, _ = binding.diagnose_mismatch(broken, "device:/dev/nonexistent-tpm", None)
    assert "cannot say which PCR changed" in line


def test_status_line_when_only_pcr15_is_sealed() -> None:
    key = SealedKey(b"", b"", "sha256", (15,), bytes(32), True, pcr_values=())
    check = pcr_diagnosis.compare(key, {}, None, Moment.NEXT_BOOT)
    assert pcr_diagnosis.status_line(key, check) == (
        "TPM2: sealed to sha256:15: the TPM will unseal at the next boot (PCR 15 is reset at "
        "reboot)"
    )


# --- the boot's unlock and `pystate status` on a real image ----------------------------------


@pytest.fixture
def image(tmp_path: Path, tpm: swtpm_helper.Swtpm) -> tuple[Path, str, Path]:
    """encrypted.img sealed to PCR 7 with an event log: (image, recovery key, log)."""
    log = tmp_path / "binary_bios_measurements"
    firmware(tpm.tcti, secure_boot_events(), log)
    path = tmp_path / "state" / "encrypted.img"
    path.parent.mkdir()
    provision.allocate(path, 32 * 1024 * 1024, Config().allocation)
    secret, vk = Secret.random(32), Secret.random(64)
    key_text = new_recovery_key()
    sealed = binding.seal(Config(), secret.value, tpm.tcti, str(log))
    provision.format_image(
        path,
        secret=secret.value,
        volume_key=vk.value,
        recovery_pass=Secret(recovery.recovery_passphrase(key_text)).value,
        sealed=sealed,
    )
    return path, key_text, log


@needs_root
def test_unlock_logs_the_diagnosis_and_records_it_in_boot_json(
    image: tuple[Path, str, Path], tpm: swtpm_helper.Swtpm, tmp_path: Path
) -> None:
    path, _, log = image
    _, key, _ = usable_token(luks.tokens(path))
    assert key.pcr_logs  # provisioning recorded the summary
    tpm.restart()
    firmware(tpm.tcti, secure_boot_events(db=b"updated db"), log)
    kmsg = tmp_path / "kmsg"
    kmsg.touch()
    report = BootReport(Log(kmsg_path=str(kmsg)))
    asked: list[str] = []

    def ask(prompt: str, attempt: int) -> bytearray | None:
        asked.append(prompt)
        return None  # nobody at the console

    with pytest.raises(unlock.UnlockError) as info:
        unlock.unlock(
            Config(), path, tmp_path / "mnt", report, ask=ask, tcti=tpm.tcti, event_log=str(log)
        )
    assert "PCR 7 changed since sealing" in str(info.value) and DB_DIFFERS in str(info.value)
    assert len(asked) == 1  # the recovery prompt was reached
    refusal = report.facts["tpm2_refusal"]
    assert isinstance(refusal, dict)
    assert refusal["line"].startswith("TPM2 refused the key sealed to sha256:7,15: PCR 7 changed")
    assert refusal["changed"][0]["events"] == DB_DIFFERS
    steps = {s.name: s for s in report.steps}
    assert DB_DIFFERS in steps["unseal"].detail
    console = kmsg.read_text()
    assert f"the TPM did not unlock {path}: TPM2 refused the key" in console
    assert DB_DIFFERS in console


def test_pystate_status_with_the_sealed_values(
    image: tuple[Path, str, Path], tpm: swtpm_helper.Swtpm, tmp_path: Path
) -> None:
    path, _, log = image
    boot_json = tmp_path / "boot.json"
    boot_json.write_text(
        json.dumps(
            {
                "outcome": "ok",
                "total_ms": 1,
                "steps": [],
                "state": {"mountpoint": str(path.parent), "fstype": "ext4"},
                "encrypted": {"unlocked_by": "tpm2"},
            }
        )
    )
    info = status.collect(boot_json, Path("/"), tcti=tpm.tcti, event_log=str(log))
    tpm_info = info["encrypted"]["luks"]["tpm2"]
    assert tpm_info["next_boot"]["unseal"] is True
    text = status.render(info)
    assert "PCR 7 unchanged since sealing: the TPM will unseal at the next boot" in text
    tpm2.pcr_extend(7, "sha256", bytes(32), tpm.tcti)
    info = status.collect(boot_json, Path("/"), tcti=tpm.tcti, event_log=str(log))
    assert info["encrypted"]["luks"]["tpm2"]["next_boot"]["unseal"] is False
    assert "the next boot will ask for the recovery key" in status.render(info)
    # The refusal of this boot, from boot.json, is shown too.
    boot = json.loads(boot_json.read_text())
    boot["tpm2_refusal"] = {"line": "TPM2 refused the key sealed to sha256:7,15: PCR 7 changed"}
    boot_json.write_text(json.dumps(boot))
    text = status.render(status.collect(boot_json, Path("/"), tcti=tpm.tcti, event_log=str(log)))
    assert "this boot: TPM2 refused the key sealed to sha256:7,15: PCR 7 changed" in text


def test_largest_token_fits_the_luks2_json_area(tmp_path: Path) -> None:
    """Real cryptsetup: three keyslots (a re-seal's worst moment) and the largest token
    pystate writes leave room in the 12 KiB JSON area of the default LUKS2 header."""
    from test_token import sealed_public, tpm2b

    img = tmp_path / "x.img"
    img.write_bytes(b"")
    os.truncate(img, 20 * 1024 * 1024)
    luks.format(img, key=b"k" * 32)
    for slot, key in ((1, b"r" * 32), (2, b"s" * 32)):
        luks.add_keyslot(img, existing_key=b"k" * 32, existing_slot=0, new_key=key, slot=slot)
    events = [
        Event(pcr, 0x80000003, ((0x000D, bytes([n]) * 64),), b"N" * n)
        for pcr in (4, 7)
        for n in range(20)
    ]
    log = tcg_eventlog.EventLog(((0x000D, 64),), tuple(events))
    replayed = tcg_eventlog.replay(log, "sha512")
    values = {4: replayed[4], 7: replayed[7]}
    logs = tuple(
        PcrLog(p.pcr, p.count, tuple(LoggedEvent(e.type, "N" * 64, e.digest) for e in p.events))
        for p in pcr_diagnosis.summarize(log, "sha512", values)
    )
    policy = tpm2_policy.policy_pcr_digest("sha512", {**values, 15: bytes(64)})
    sealed = SealedKey(
        public=sealed_public(policy),
        private=tpm2b(bytes(158)),
        bank="sha512",
        pcrs=(4, 7, 15),
        policy_hash=policy,
        pcr15_zero=True,
        pcr_values=tuple(sorted(values.items())),
    )
    token = encode_token(sealed, 2)
    token["pystate-pcr-events"] = {
        str(p.pcr): {
            "count": p.count,
            "events": [
                ["EV_EFI_BOOT_SERVICES_APPLICATION", e.name, e.digest.hex()] for e in p.events
            ],
        }
        for p in logs
    }  # fmt: skip (the longest names; not replayable, so not checked against the values)
    luks.token_import(img, json.dumps(token, separators=(",", ":")), None, replace=False)
    header = luks.read_header(img)
    used = len(json.dumps(header.metadata, separators=(",", ":")))
    assert used < 9 * 1024 < header.header_size - 4096
    assert decode_token(header.metadata["tokens"]["0"])[0].pcr_logs
