"""The encrypted area at boot: provision encrypted.img or unlock it, then hand back its mount.

Called by the boot pipeline between mount-state and plan. Decisions, in order:

1. read-only state partition (GPT bit 60): open an existing image read-only, never provision
   (nor reset: ``pystate.factory-reset=1`` is then a warning);
2. a factory reset (initrd/factory_reset.py, formats/reset_decision.py): only with
   ``pystate.factory-reset=1`` *and* a request made by ``pystate factory-reset`` (or a reset
   cut short, found by its marker): marker, request consumed, crypto-erase, plain entries
   deleted; then on to 4, and the marker goes once the image is made. The word alone is a
   warning, and nothing is erased (SPEC §11.6);
3. a leftover ``encrypted.img.new``: an interrupted first boot, crypto-erased and deleted
   (SPEC §6);
4. no ``encrypted.img``: provision it (provision.py) — unless the machine has no TPM at
   all: then the boot stops with ``NoTpmAtFirstBoot`` before anything is made (SPEC §11.1),
   or, with ``[tpm2] required = no``, nothing is made and the boot goes on with the plain
   entries, loudly;
5. else unlock it (unlock.py): TPM2, then the recovery key.

A test build of the program may act before the TPM is asked and after each provisioning
step (volume/hooks.py); the program a distributor ships does nothing there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pystate_initrd.config import Area, Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import names
from pystate_initrd.formats.reset_decision import Action, Decision, Inputs, decide
from pystate_initrd.initrd import factory_reset, provision, unlock
from pystate_initrd.report import BootReport
from pystate_initrd.system import askpass, efivars, tpm2
from pystate_initrd.volume import hooks


class EncryptedError(PystateError):
    """The encrypted area's files on /state are not what pystate made."""


class NoTpmAtFirstBoot(PystateError):
    """A first boot on a machine without a TPM2, with ``[tpm2] required = yes`` (SPEC §11.1)."""


def no_tpm_at_first_boot(cfg: Config, image: Path) -> NoTpmAtFirstBoot:
    """The stop for a first boot without a TPM: what would be lost, what to do."""
    targets = ", ".join(e.target for e in cfg.layout if e.area is Area.ENCRYPTED)
    held = f" ({targets} would stay on the read-only image)" if targets else ""
    return NoTpmAtFirstBoot(
        f"no TPM2 on this machine: the first boot cannot create {image}{held}; "
        "nothing was created",
        hint="enable the TPM in the firmware and reboot, or set [tpm2] required = no in the "
        "initrd's pystate.conf to boot with the plain entries only",
    )


def _check_image(image: Path) -> bool:
    """Whether encrypted.img exists; EncryptedError when it is not a regular file."""
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise EncryptedError(
            f"{image} is not a regular file; refusing to open or replace it",
            hint="move it away from the emergency shell; nothing was changed",
        )
    return True


def _decide_reset(
    cfg: Config, state_dir: Path, report: BootReport, efivars_dir: Path
) -> tuple[Inputs, Decision]:
    """Look, decide, say so (log and boot.json), and drop a marker that is not acted on."""
    log = report.log
    found = factory_reset.look(cfg, state_dir, efivars_dir)
    decision = decide(found)
    for warning in decision.warnings:
        log.warning(warning)
    for note in decision.notes:
        log.info(note)
    if decision.resets:
        log.notice(f"factory reset: {decision.reason}")
    if factory_reset.relevant(found):
        report.facts["factory_reset"] = factory_reset.facts(found, decision)
    if decision.drop_marker:
        factory_reset.remove_marker(state_dir)
    return found, decision


def _refuse_reset_without_tpm(cfg: Config, decision: Decision, tcti: str | None) -> None:
    """The reset provisions afresh, which needs the TPM: without one, refuse before erasing
    anything (more) rather than leave a machine that stops at every boot."""
    if not cfg.tpm2_required:
        return
    tpm2.wait_for_tpm(tcti)
    if tpm2.tpm_present(tcti):
        return
    if decision.action is Action.FINISH:
        raise NoTpmAtFirstBoot(
            "no TPM2 on this machine: the factory reset cut short cannot provision a new "
            "encrypted.img; nothing more was erased",
            hint="enable the TPM in the firmware and reboot: the reset then finishes; or set "
            "[tpm2] required = no in the initrd's pystate.conf",
        )
    raise NoTpmAtFirstBoot(
        "no TPM2 on this machine: a factory reset would erase the state and then "
        "be unable to provision it; nothing was erased",
        hint="enable the TPM in the firmware and reboot with the reset again, or set "
        "[tpm2] required = no in the initrd's pystate.conf",
    )


def _first_boot(
    cfg: Config,
    state_dir: Path,
    sysroot: Path,
    report: BootReport,
    cmdline: str,
    tcti: str | None,
) -> Path | None:
    """No encrypted.img: provision it, or say why not (no TPM)."""
    image = state_dir / names.IMAGE
    tpm2.wait_for_tpm(tcti)
    if not tpm2.tpm_present(tcti):
        if cfg.tpm2_required:
            raise no_tpm_at_first_boot(cfg, image)
        report.log.error(
            f"no TPM2 on this machine: {image} is not created and the encrypted entries "
            "are not mounted; only plain entries are ([tpm2] required = no)"
        )
        report.facts["encrypted"] = {"state": "not provisioned: no TPM2"}
        return None
    made = provision.provision(
        cfg,
        state_dir,
        sysroot,
        report,
        tcti=tcti,
        hook=hooks.provision_hook(cmdline, report.log.error),
    )
    report.facts["encrypted"] = {**made.opened.to_json(), "size": made.size}
    return made.opened.mountpoint


def setup(
    cfg: Config,
    state_dir: Path,
    sysroot: Path,
    report: BootReport,
    cmdline: str,
    *,
    read_only: bool = False,
    tcti: str | None = None,
    ask: unlock.Ask = askpass.ask,
    efivars_dir: Path = efivars.DEFAULT_DIR,
) -> Path | None:
    """Provision or unlock encrypted.img; the opened image's mount point, or None."""
    log = report.log
    image = state_dir / names.IMAGE
    mountpoint = state_dir / names.MOUNT_DIR

    if read_only:
        if cfg.factory_reset:
            log.warning(
                "pystate.factory-reset=1 ignored: the state partition is read-only "
                "(GPT bit 60); nothing was erased"
            )
        if not _check_image(image):
            report.facts["encrypted"] = {"state": "absent (read-only state partition)"}
            return None
        opened = unlock.unlock(cfg, image, mountpoint, report, ask=ask, tcti=tcti, read_only=True)
        report.facts["encrypted"] = opened.to_json()
        return opened.mountpoint

    found, decision = _decide_reset(cfg, state_dir, report, efivars_dir)
    if decision.resets:
        _refuse_reset_without_tpm(cfg, decision, tcti)
        factory_reset.begin(state_dir, efivars_dir, found, decision, report)
        removed = factory_reset.destroy(state_dir, report)
        reset_facts = report.facts.setdefault("factory_reset", {})
        assert isinstance(reset_facts, dict)
        reset_facts["removed"] = removed
    if (state_dir / names.NEW_IMAGE).exists() or (state_dir / names.NEW_IMAGE).is_symlink():
        with report.step("discard-leftover") as s:
            s.detail = provision.remove_leftover(state_dir) or ""

    hooks.before_unseal(cmdline, str(cfg.pcr_bank), tcti, log.warning)

    if _check_image(image):
        opened = unlock.unlock(
            cfg, image, mountpoint, report, ask=ask, tcti=tcti,
            hook=hooks.provision_hook(cmdline, report.log.error),
        )  # fmt: skip
        report.facts["encrypted"] = opened.to_json()
        result: Path | None = opened.mountpoint
    else:
        result = _first_boot(cfg, state_dir, sysroot, report, cmdline, tcti)
    if decision.resets:
        factory_reset.end(state_dir, report)
        reset_facts = report.facts["factory_reset"]
        assert isinstance(reset_facts, dict)
        reset_facts["complete"] = True
    return result
