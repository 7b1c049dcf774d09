"""Factory reset, one-shot (SPEC §6, §11.6; docs/factory-reset.md).

Three layers:
- the decision (formats/reset_decision.py): a table, one line per case;
- encrypted.img's state beside a marker, from real cryptsetup images;
- encrypted.setup() at boot, on a real state tree with a real LUKS2 image (a TPM-like keyslot
  and a recovery keyslot, made by cryptsetup), as a user would notice it: what is left on
  /state, whether the old recovery passphrase still opens the old image's bytes (a hard link
  kept outside /state sees the same inode after encrypted.img is deleted), the variables left.

This host has no efivarfs and no device-mapper. A temporary directory stands in for
/sys/firmware/efi/efivars (the same file names and bytes), and the boot stops at the seams the
other host tests use: unlocking (unlock.unlock, replaced by a stand-in that records the call)
and provisioning (provision.provision: a stand-in that cuts the power, or no TPM with
`[tpm2] required = no`, where a reset provisions nothing). The QEMU test boots the real thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import swtpm as swtpm_helper
from test_luks import cryptsetup, opens

from pystate_initrd.config import Config, load_config
from pystate_initrd.formats import efivar
from pystate_initrd.formats.recovery import recovery_passphrase
from pystate_initrd.formats.reset_decision import (
    WORD_IGNORED,
    Action,
    ImageState,
    Inputs,
    RequestSource,
    decide,
    image_state,
)
from pystate_initrd.initrd import encrypted, factory_reset, provision, unlock
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.secret import new_recovery_key
from pystate_initrd.system import efivars, luks
from pystate_initrd.volume import stack

tpm = swtpm_helper.tpm
swtpm = swtpm_helper.swtpm
needs_swtpm = swtpm_helper.needs_swtpm

MiB = 1 << 20
ENTRY = "pystate-factory-reset.efi"
KEY = bytes(range(32))  # keyslot 0: what the TPM would release
RECOVERY = new_recovery_key()
NO_TPM = "device:/dev/nonexistent-tpm"
E = RequestSource.EFI_VARIABLE


# --- the decision: one helper, one line per case ----------------------------------------------


def check_decide_one(
    inputs: Inputs, action: Action, reason: str, warnings: tuple[str, ...], drop: bool
) -> None:
    d = decide(inputs)
    assert d.action is action, d
    assert reason in d.reason, d.reason
    assert len(d.warnings) == len(warnings), d.warnings
    for got, fragment in zip(d.warnings, warnings, strict=True):
        assert fragment in got, (fragment, got)
    assert d.drop_marker is drop
    assert d.resets is (action is not Action.BOOT)


R, F, B = Action.RESET, Action.FINISH, Action.BOOT
INTACT, ERASED, ABSENT, NOT_LUKS = (
    ImageState.INTACT,
    ImageState.ERASED,
    ImageState.ABSENT,
    ImageState.NOT_LUKS,
)
MARKED = "exists beside an intact encrypted.img"  # the warning for a marker not acted on
IGNORED = WORD_IGNORED
PENDING = "the request stays pending"
OTHER = "debian.conf"
NONE = RequestSource.NONE


def word(**kw: Any) -> Inputs:
    return Inputs(word=True, **kw)


def no_word(**kw: Any) -> Inputs:
    return Inputs(word=False, **kw)


DECIDE_CASES: list[tuple[Inputs, Action, str, tuple[str, ...], bool]] = [
    # Nothing: a normal boot.
    (no_word(), B, "no pystate.factory-reset=1", (), False),
    # The word alone (a persistent command line): nothing is erased, a warning.
    (word(), B, IGNORED, (IGNORED,), False),
    (word(efi=False), B, IGNORED, ("no EFI variables here: not a UEFI boot",), False),
    (word(selected=ENTRY), B, IGNORED, (IGNORED,), False),
    # The word and the request.
    (word(request=ENTRY, selected=ENTRY), R, f"request for boot entry {ENTRY!r}", (), False),
    (word(request=ENTRY), R, "the boot loader does not say which entry", (), False),
    (word(request=ENTRY, selected=ENTRY.upper()), R, "booted entry", (), False),
    (word(request="Reset.EFI", selected="reset.efi"), R, "request", (), False),
    # ... but another entry was booted (it has the word too): the request stays pending.
    (word(request=ENTRY, selected=OTHER), B, f"this boot's entry is {OTHER!r}", (PENDING,), False),
    (word(request=ENTRY, selected_error="bad"), B, "cannot be read (bad)", (PENDING,), False),
    # A request without the word: pending, no warning (a note).
    (no_word(request=ENTRY, selected=OTHER), B, "no pystate.factory-reset=1", (), False),
    # An unreadable request is no request.
    (word(request_error="odd"), B, IGNORED, ("cannot be read: odd", IGNORED), False),
    (no_word(request_error="odd"), B, "no pystate", ("cannot be read: odd",), False),
    # [state] factory-reset-request = none: the word alone, no EFI variable looked at.
    (word(source=NONE), R, "factory-reset-request = none", (), False),
    (word(source=NONE, efi=False), R, "the word alone", (), False),
    (no_word(source=NONE, request=ENTRY), B, "no pystate", (), False),
    # A marker: finished when the erase had begun, whatever the command line says ...
    (no_word(marker=True, image=ABSENT), F, "encrypted.img absent", (), False),
    (no_word(marker=True, image=ERASED), F, "encrypted.img erased", (), False),
    (no_word(marker=True, image=NOT_LUKS), F, "encrypted.img not LUKS", (), False),
    (word(marker=True, image=ERASED), F, "cut short", (), False),
    (no_word(source=NONE, marker=True, image=ABSENT), F, "cut short", (), False),
    # ... and beside an intact image it is dropped, nothing erased; the rest decides as usual.
    (no_word(marker=True, image=INTACT), B, "no pystate", (MARKED,), True),
    (word(marker=True, image=INTACT), B, IGNORED, (MARKED, IGNORED), True),
    (word(request=ENTRY, marker=True, image=INTACT), R, "request", (MARKED,), True),
]


@pytest.mark.parametrize(("inputs", "action", "reason", "warnings", "drop"), DECIDE_CASES)
def test_decide(
    inputs: Inputs, action: Action, reason: str, warnings: tuple[str, ...], drop: bool
) -> None:
    check_decide_one(inputs, action, reason, warnings, drop)


def test_a_pending_request_is_a_note() -> None:
    d = decide(Inputs(word=False, request=ENTRY, selected=OTHER))
    assert d.notes == (
        f"a factory reset is pending for boot entry {ENTRY!r}; this boot (entry {OTHER!r}) has "
        "no pystate.factory-reset=1, so nothing was reset: it stays pending (boot that entry to "
        "reset, or withdraw it with `pystate factory-reset --cancel`)",
    )


def test_a_marker_needs_the_image_state() -> None:
    with pytest.raises(ValueError, match="image"):
        decide(Inputs(word=False, marker=True))


def test_the_warning_for_the_word_alone() -> None:
    assert WORD_IGNORED == (
        "pystate.factory-reset=1 ignored: no reset was requested on this machine with "
        "`pystate factory-reset`; a factory reset comes from a one-shot boot entry (SPEC §11.6)"
    )


# --- real images -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image as provisioning leaves it: keyslot 0 (the TPM's key), keyslot 1 (recovery)."""
    image = tmp_path_factory.mktemp("reset") / "template.img"
    with open(image, "wb") as f:
        f.truncate(20 * MiB)
    luks.format(image, key=KEY)
    luks.add_keyslot(
        image, existing_key=KEY, existing_slot=0, new_key=recovery_passphrase(RECOVERY), slot=1
    )
    assert opens(image, recovery_passphrase(RECOVERY), 1)
    return image


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_bytes(path: Path) -> bytes:
    return path.read_bytes()[: 8 * MiB + 4096]


def test_image_state_of_real_images(template: Path, tmp_path: Path) -> None:
    image = tmp_path / "encrypted.img"
    assert image_state(None) is ImageState.ABSENT
    assert factory_reset.read_image_state(image) is ImageState.ABSENT
    shutil.copyfile(template, image)
    assert image_state(header_bytes(image)) is ImageState.INTACT
    assert factory_reset.read_image_state(image) is ImageState.INTACT
    luks.kill_keyslot(image, 0)  # one keyslot left is not erased
    assert factory_reset.read_image_state(image) is ImageState.INTACT
    luks.erase(image)
    assert luks.keyslots(image) == {}
    assert factory_reset.read_image_state(image) is ImageState.ERASED
    # Both header copies damaged: its keyslots' bytes may be there still; never "erased".
    with open(image, "r+b") as f:
        f.write(b"\0" * 16)  # the primary's magic
        f.seek(16384 + 4096 + 2)
        f.write(b"\xff" * 64)  # the secondary's JSON
    assert factory_reset.read_image_state(image) is ImageState.INTACT
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MiB))
    assert factory_reset.read_image_state(zeros) is ImageState.NOT_LUKS
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    assert factory_reset.read_image_state(empty) is ImageState.NOT_LUKS
    luks1 = tmp_path / "luks1.img"
    luks1.write_bytes(bytes(4 * MiB))
    proc = cryptsetup(
        "luksFormat", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000",
        "--key-file=-", str(luks1), key=b"k",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert factory_reset.read_image_state(luks1) is ImageState.INTACT
    (tmp_path / "dir.img").mkdir()
    assert factory_reset.read_image_state(tmp_path / "dir.img") is ImageState.INTACT


# --- at boot: encrypted.setup() on a real state tree -------------------------------------------


class PowerCut(Exception):
    """The stand-in for provisioning cuts the power."""


@dataclass
class Seams:
    unlocked: list[Path] = field(default_factory=list)
    provisioned: int = 0


@pytest.fixture
def seams(monkeypatch: pytest.MonkeyPatch) -> Seams:
    """Unlocking records the call (the host has no device-mapper); provisioning, when a TPM is
    there, cuts the power before it makes anything."""
    seen = Seams()

    def fake_unlock(
        cfg: Config, image: Path, mountpoint: Path, report: BootReport, **kw: object
    ) -> stack.Opened:
        seen.unlocked.append(image)
        return stack.Opened(image, "/dev/loop-test", mountpoint, luks.uuid(image), "tpm2")

    def fake_provision(*args: object, **kw: object) -> provision.Provisioned:
        seen.provisioned += 1
        raise PowerCut

    monkeypatch.setattr(unlock, "unlock", fake_unlock)
    monkeypatch.setattr(provision, "provision", fake_provision)
    return seen


@dataclass
class Machine:
    state: Path
    efi: Path  # stands in for /sys/firmware/efi/efivars
    kept: Path  # a hard link to encrypted.img's inode, outside /state
    kmsg: Path

    def request(self, entry: str = ENTRY) -> None:
        """What `pystate factory-reset --yes` leaves, after systemd-boot read the one-shot."""
        efivars.write_string(self.efi, efivar.FACTORY_RESET_REQUEST, entry)

    def selected(self, entry: str) -> None:
        efivars.write_string(self.efi, efivar.LOADER_ENTRY_SELECTED, entry)

    def variables(self) -> list[str]:
        return sorted(p.name.split("-")[0] for p in self.efi.iterdir())

    def listing(self) -> list[str]:
        return sorted(str(p.relative_to(self.state)) for p in self.state.rglob("*"))

    def log(self) -> list[str]:
        return self.kmsg.read_text().splitlines()

    def boot(
        self,
        cmdline: str = "quiet",
        conf: str | None = None,
        *,
        tcti: str = NO_TPM,
        required: bool = False,
        read_only: bool = False,
    ) -> BootReport:
        path = self.state.parent / "pystate.conf"
        if conf is not None:
            path.write_text(conf)
        cfg = dataclasses.replace(load_config(path, cmdline), tpm2_required=required)
        report = BootReport(Log(kmsg_path=str(self.kmsg)))
        try:
            encrypted.setup(
                cfg,
                self.state,
                self.state.parent / "sysroot",
                report,
                cmdline,
                tcti=tcti,
                read_only=read_only,
                efivars_dir=self.efi,
            )
        finally:
            report.log.close()
        return report


@pytest.fixture
def machine(template: Path, tmp_path: Path) -> Machine:
    state, efi = tmp_path / "state", tmp_path / "efivars"
    (state / "home/alice").mkdir(parents=True)
    (state / "home/alice/notes").write_text("mine\n")
    (state / "srv").mkdir()
    (state / ".pystate").mkdir()
    (state / "encrypted").mkdir()
    (state / "lost+found").mkdir()
    shutil.copyfile(template, state / "encrypted.img")
    efi.mkdir()
    kept = tmp_path / "kept.img"
    os.link(state / "encrypted.img", kept)
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    return Machine(state, efi, kept, kmsg)


UNTOUCHED = [
    ".pystate",
    "encrypted",
    "encrypted.img",
    "home",
    "home/alice",
    "home/alice/notes",
    "lost+found",
    "srv",
]
AFTER_RESET = [".pystate", "encrypted", "lost+found"]
WORD = "quiet pystate.factory-reset=1"


def assert_erased(m: Machine) -> None:
    """The old image's inode: every keyslot gone, the recovery passphrase opens nothing."""
    assert not opens(m.kept, recovery_passphrase(RECOVERY), 1)
    assert not opens(m.kept, KEY, 0)
    assert luks.keyslots(m.kept) == {}


def assert_intact(m: Machine, before: str) -> None:
    assert digest(m.state / "encrypted.img") == before
    assert opens(m.state / "encrypted.img", recovery_passphrase(RECOVERY), 1)


def test_the_word_alone_erases_nothing(machine: Machine, seams: Seams) -> None:
    """A persistent pystate.factory-reset=1 (no request): a warning, a normal boot."""
    before = digest(machine.state / "encrypted.img")
    r = machine.boot(WORD)
    assert machine.listing() == UNTOUCHED
    assert_intact(machine, before)
    assert seams.unlocked == [machine.state / "encrypted.img"]
    assert [s.name for s in r.steps] == []
    facts = r.facts["factory_reset"]
    assert isinstance(facts, dict)
    assert facts["action"] == "boot" and facts["warnings"][0].startswith(WORD_IGNORED)
    assert f"<4>pystate: {WORD_IGNORED}" in machine.log()
    # ... at every boot: it never becomes a reset.
    machine.boot(WORD)
    assert_intact(machine, before)


def test_the_requested_entry_resets_once(machine: Machine, seams: Seams) -> None:
    machine.request()
    machine.selected(ENTRY)
    efivars.write_string(machine.efi, efivar.LOADER_ENTRY_ONESHOT, ENTRY)  # a loader that kept it
    assert opens(machine.kept, recovery_passphrase(RECOVERY), 1)
    r = machine.boot(WORD)
    assert_erased(machine)
    assert machine.listing() == AFTER_RESET
    assert machine.variables() == ["LoaderEntrySelected"]  # request and one-shot consumed
    assert [s.name for s in r.steps] == ["reset-begin", "factory-reset", "reset-end"]
    steps = {s.name: s.detail for s in r.steps}
    assert steps["reset-begin"] == (
        f"marker .pystate/factory-reset written; request {efivar.FACTORY_RESET_REQUEST} "
        f"deleted; {efivar.LOADER_ENTRY_ONESHOT} deleted"
    )
    assert steps["factory-reset"] == (
        "encrypted.img: every keyslot destroyed (cryptsetup erase), deleted; "
        "plain entries removed: home, srv"
    )
    assert steps["reset-end"] == "marker .pystate/factory-reset removed: factory reset complete"
    assert r.facts["factory_reset"] == {
        "action": "reset",
        "reason": f"pystate.factory-reset=1 and the request for boot entry {ENTRY!r} "
        f"(booted entry {ENTRY!r})",
        "word": True,
        "source": "efi-variable",
        "request": ENTRY,
        "selected": ENTRY,
        "marker": False,
        "image": None,
        "warnings": [],
        "notes": [],
        "removed": ["home", "srv"],
        "complete": True,
    }
    assert r.facts["encrypted"] == {"state": "not provisioned: no TPM2"}  # required = no here
    log = machine.log()
    reason = "<5>pystate: factory reset: pystate.factory-reset=1 and the request for boot entry"
    assert any(line.startswith(reason) for line in log)
    assert any(line.startswith("<6>pystate: factory-reset done in ") for line in log)
    # One-shot: the same command line at the next boot is only the warning.
    (machine.state / "home").mkdir()
    r = machine.boot(WORD)
    assert (machine.state / "home").is_dir()
    assert [s.name for s in r.steps] == []


def test_without_a_selected_entry_the_request_decides(machine: Machine, seams: Seams) -> None:
    """A boot loader that does not say which entry it booted (no LoaderEntrySelected)."""
    machine.request()
    machine.boot(WORD)
    assert_erased(machine)
    assert machine.listing() == AFTER_RESET
    assert machine.variables() == []


def test_another_entry_with_the_word_leaves_the_request_pending(
    machine: Machine, seams: Seams
) -> None:
    machine.request()
    machine.selected("debian-rescue.conf")
    before = digest(machine.state / "encrypted.img")
    r = machine.boot(WORD)
    assert machine.listing() == UNTOUCHED
    assert_intact(machine, before)
    assert machine.variables() == ["LoaderEntrySelected", "PystateFactoryReset"]
    facts = r.facts["factory_reset"]
    assert isinstance(facts, dict)
    assert "but this boot's entry is 'debian-rescue.conf'" in facts["reason"]


def test_a_request_without_the_word_stays_pending(machine: Machine, seams: Seams) -> None:
    """Someone picked the normal entry: the request waits, the boot says so."""
    machine.request()
    machine.selected("debian.conf")
    before = digest(machine.state / "encrypted.img")
    r = machine.boot("quiet")
    assert_intact(machine, before)
    assert machine.listing() == UNTOUCHED
    assert "PystateFactoryReset" in machine.variables()
    assert any(
        line.startswith(f"<6>pystate: a factory reset is pending for boot entry {ENTRY!r}")
        for line in machine.log()
    )
    facts = r.facts["factory_reset"]
    assert isinstance(facts, dict) and facts["action"] == "boot" and facts["request"] == ENTRY


def test_no_facts_on_an_ordinary_boot(machine: Machine, seams: Seams) -> None:
    r = machine.boot("quiet")
    assert "factory_reset" not in r.facts
    assert machine.listing() == UNTOUCHED and seams.unlocked


def test_a_marker_beside_an_intact_image_erases_nothing(machine: Machine, seams: Seams) -> None:
    """/state is writable offline: a marker someone put there beside an intact image is
    removed with a warning, and the image is unlocked as usual."""
    (machine.state / ".pystate/factory-reset").write_text("planted\n")
    before = digest(machine.state / "encrypted.img")
    r = machine.boot("quiet")
    assert_intact(machine, before)
    assert machine.listing() == UNTOUCHED  # the marker went
    assert seams.unlocked
    assert any(
        line.startswith("<4>pystate: .pystate/factory-reset exists beside an intact encrypted.img")
        for line in machine.log()
    )
    facts = r.facts["factory_reset"]
    assert isinstance(facts, dict) and facts["marker"] and facts["image"] == "intact"


@pytest.mark.parametrize("how", ["erased", "deleted", "not LUKS"])
def test_a_reset_cut_short_is_finished(machine: Machine, seams: Seams, how: str) -> None:
    """The power went after the erase began; the next boot, from the default entry (no word,
    no request left), finishes the reset."""
    image = machine.state / "encrypted.img"
    (machine.state / ".pystate/factory-reset").write_text("pystate factory reset under way\n")
    if how == "erased":
        luks.erase(image)
    elif how == "deleted":
        image.unlink()
    else:
        image.unlink()
        image.write_bytes(bytes(MiB))  # (never made by pystate; nothing to keep either)
    r = machine.boot("quiet")
    assert machine.listing() == AFTER_RESET
    assert [s.name for s in r.steps] == ["reset-begin", "factory-reset", "reset-end"]
    assert r.steps[0].detail.startswith("marker .pystate/factory-reset found: finishing the reset")
    facts = r.facts["factory_reset"]
    assert isinstance(facts, dict) and facts["action"] == "finish" and facts["complete"]
    assert not seams.unlocked


@needs_swtpm
def test_a_power_cut_at_provisioning_is_finished_next_boot(
    machine: Machine, seams: Seams, tpm: swtpm_helper.Swtpm
) -> None:
    """With a TPM the reset goes on to provisioning; the power goes there. The marker is
    still on /state, the image is gone: the next boot finishes (here without a TPM, with
    required = no, so that it provisions nothing and the host can follow it)."""
    machine.request()
    machine.selected(ENTRY)
    with pytest.raises(PowerCut):
        machine.boot(WORD, tcti=tpm.tcti, required=True)
    assert seams.provisioned == 1
    assert_erased(machine)
    assert machine.listing() == [".pystate", ".pystate/factory-reset", "encrypted", "lost+found"]
    assert machine.variables() == ["LoaderEntrySelected"]
    (machine.state / "home").mkdir()  # say provisioning had made the plain entry already
    r = machine.boot("quiet")
    assert machine.listing() == AFTER_RESET
    facts = r.facts["factory_reset"]
    assert isinstance(facts, dict) and facts["action"] == "finish" and facts["image"] == "absent"


def test_no_tpm_refuses_before_erasing_anything(machine: Machine, seams: Seams) -> None:
    """A reset that could not provision afresh (no TPM, required by default) is refused
    before the marker: the image, the plain entries and the request stay."""
    machine.request()
    before = digest(machine.state / "encrypted.img")
    with pytest.raises(encrypted.NoTpmAtFirstBoot, match="nothing was erased"):
        machine.boot(WORD, required=True)
    assert_intact(machine, before)
    assert machine.listing() == UNTOUCHED
    assert machine.variables() == ["PystateFactoryReset"]


def test_a_request_that_cannot_be_consumed_erases_nothing(
    machine: Machine, seams: Seams, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine.request()
    before = digest(machine.state / "encrypted.img")

    def read_only(directory: Path, file: str) -> bool:
        raise efivars.EfiVarsError(f"cannot delete EFI variable {file} in {directory}: EROFS")

    monkeypatch.setattr(efivars, "delete", read_only)
    with pytest.raises(factory_reset.FactoryResetError, match="nothing was erased"):
        machine.boot(WORD)
    assert_intact(machine, before)
    assert machine.listing() == UNTOUCHED  # the marker was taken back


def test_the_word_alone_with_request_none(machine: Machine, seams: Seams) -> None:
    """[state] factory-reset-request = none (GRUB's grub-reboot, no EFI variables)."""
    shutil.rmtree(machine.efi)
    r = machine.boot(WORD, "[state]\nfactory-reset-request = none\n")
    assert_erased(machine)
    assert machine.listing() == AFTER_RESET
    assert r.steps[0].detail.endswith("; no request to consume")


def test_no_efivars_and_the_word(machine: Machine, seams: Seams) -> None:
    shutil.rmtree(machine.efi)
    before = digest(machine.state / "encrypted.img")
    r = machine.boot(WORD)
    assert_intact(machine, before)
    facts = r.facts["factory_reset"]
    assert isinstance(facts, dict)
    assert "factory-reset-request = none" in facts["warnings"][0]


def test_read_only_state_ignores_the_word(machine: Machine, seams: Seams) -> None:
    machine.request()
    before = digest(machine.state / "encrypted.img")
    machine.boot(WORD, read_only=True)
    assert_intact(machine, before)
    assert "PystateFactoryReset" in machine.variables()
    assert any("ignored: the state partition is read-only" in line for line in machine.log())


def test_a_symlinked_meta_dir_is_refused_before_erasing(machine: Machine, seams: Seams) -> None:
    elsewhere = machine.state.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(machine.state / ".pystate")
    (machine.state / ".pystate").symlink_to(elsewhere)
    machine.request()
    before = digest(machine.state / "encrypted.img")
    with pytest.raises(factory_reset.FactoryResetError, match="is not a directory"):
        machine.boot(WORD)
    assert_intact(machine, before)
    assert list(elsewhere.iterdir()) == []
    assert "PystateFactoryReset" in machine.variables()
    # Without a reset to start, such a .pystate stops nothing: no marker can be in it.
    (elsewhere / "factory-reset").write_text("planted\n")
    machine.boot("quiet")
    assert (elsewhere / "factory-reset").exists()
    assert seams.unlocked


def test_delete_plain_follows_no_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    state = tmp_path / "state"
    state.mkdir()
    (state / "home").symlink_to(victim)
    assert factory_reset.delete_plain(state) == ["home"]
    assert (victim / "keep").read_text() == "x"


# --- pystate status --------------------------------------------------------------------------


def test_status_says_what_this_boot_did_and_what_is_pending(tmp_path: Path) -> None:
    import json

    from pystate_initrd.booted import status

    efi = tmp_path / "efivars"
    efi.mkdir()
    boot = {"outcome": "ok", "error": None, "total_ms": 1.0, "steps": []}
    (tmp_path / "boot.json").write_text(json.dumps({**boot, "factory_reset": decide_facts(word())}))
    text = status.render(status.collect(tmp_path / "boot.json", tmp_path, efivars=efi))
    assert f"this boot: {WORD_IGNORED}" in text
    assert "REQUESTED" not in text

    efivars.write_string(efi, efivar.FACTORY_RESET_REQUEST, ENTRY)
    text = status.render(status.collect(tmp_path / "boot.json", tmp_path, efivars=efi))
    assert (
        f"factory reset: REQUESTED for boot entry {ENTRY!r} (no one-shot entry set: pick it in "
        "the boot menu)"
    ) in text
    reset = {**decide_facts(word(request=ENTRY)), "complete": True}
    (tmp_path / "boot.json").write_text(json.dumps({**boot, "factory_reset": reset}))
    efivars.delete(efi, efivar.FACTORY_RESET_REQUEST)
    text = status.render(status.collect(tmp_path / "boot.json", tmp_path, efivars=efi))
    assert "factory reset: done at this boot (pystate.factory-reset=1 and the request" in text


def decide_facts(inputs: Inputs) -> dict[str, Any]:
    return factory_reset.facts(inputs, decide(inputs))
