"""The encrypted area at boot: provision encrypted.img or unlock it, then hand back its mount.

Called by the boot pipeline between mount-state and plan. Decisions, in order:

1. read-only state partition (GPT bit 60): open an existing image read-only, never provision;
2. ``pystate.factory-reset=1``: crypto-erase the image and delete the plain entries;
3. a leftover ``encrypted.img.new``: an interrupted first boot, deleted (SPEC §6);
4. no ``encrypted.img``: provision it (provision.py) — unless the machine has no TPM at
   all: then the boot stops with ``NoTpmAtFirstBoot`` before anything is made (SPEC §11.1),
   or, with ``[tpm2] required = no``, nothing is made and the boot goes on with the plain
   entries, loudly;
5. else unlock it (unlock.py): TPM2, then the recovery key.

A test build of the program may act before the TPM is asked and after each provisioning
step (volume/hooks.py); the program a distributor ships does nothing there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from pystate_initrd.config import Area, Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import names
from pystate_initrd.initrd import provision, unlock
from pystate_initrd.report import BootReport
from pystate_initrd.system import askpass, luks, tpm2
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


def factory_reset(state_dir: Path) -> list[str]:
    """Crypto-erase encrypted.img and delete it and every plain entry; what went."""
    gone = []
    image = state_dir / names.IMAGE
    if image.is_file() and not image.is_symlink():
        # Not a LUKS image: nothing to erase; it is deleted all the same.
        with contextlib.suppress(luks.NotLuks):
            luks.erase(image)
        gone.append(names.IMAGE)
    for entry in os.scandir(state_dir):
        if entry.name.startswith(".") or entry.name in names.RESERVED_PLAIN - {names.IMAGE}:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        gone.append(entry.name)
    provision.fsync_dir(state_dir)
    return sorted(set(gone))


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
) -> Path | None:
    """Provision or unlock encrypted.img; the opened image's mount point, or None."""
    log = report.log
    image = state_dir / names.IMAGE
    mountpoint = state_dir / names.MOUNT_DIR

    if read_only:
        if not _check_image(image):
            report.facts["encrypted"] = {"state": "absent (read-only state partition)"}
            return None
        opened = unlock.unlock(cfg, image, mountpoint, report, ask=ask, tcti=tcti, read_only=True)
        report.facts["encrypted"] = opened.to_json()
        return opened.mountpoint

    if cfg.factory_reset:
        # The reset provisions afresh, which needs the TPM: without one, refuse before
        # erasing anything rather than leave a machine that stops at every boot.
        if cfg.tpm2_required:
            tpm2.wait_for_tpm(tcti)
            if not tpm2.tpm_present(tcti):
                raise NoTpmAtFirstBoot(
                    "no TPM2 on this machine: a factory reset would erase the state and then "
                    "be unable to provision it; nothing was erased",
                    hint="enable the TPM in the firmware and reboot with the reset again, or set "
                    "[tpm2] required = no in the initrd's pystate.conf",
                )
        with report.step("factory-reset") as s:
            gone = factory_reset(state_dir)
            s.detail = "removed " + (", ".join(gone) or "nothing")
    if (state_dir / names.NEW_IMAGE).exists() or (state_dir / names.NEW_IMAGE).is_symlink():
        with report.step("discard-leftover") as s:
            provision.remove_leftover(state_dir)
            s.detail = f"deleted {names.NEW_IMAGE} of an interrupted first boot"

    hooks.before_unseal(cmdline, str(cfg.pcr_bank), tcti, log.warning)

    if not _check_image(image):
        tpm2.wait_for_tpm(tcti)
        if not tpm2.tpm_present(tcti):
            if cfg.tpm2_required:
                raise no_tpm_at_first_boot(cfg, image)
            log.error(
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
            hook=hooks.provision_hook(cmdline, log.error),
        )
        report.facts["encrypted"] = {**made.opened.to_json(), "size": made.size}
        return made.opened.mountpoint

    opened = unlock.unlock(cfg, image, mountpoint, report, ask=ask, tcti=tcti)
    report.facts["encrypted"] = opened.to_json()
    return opened.mountpoint
