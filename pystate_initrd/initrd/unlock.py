"""Opening encrypted.img at boot: TPM2 first, the recovery key when the TPM cannot (SPEC §5).

The path, one timed step each (SPEC §10 counts every process):
luks-header (read and check both header copies, no process) → unseal (the
``pystate-tpm2`` token's blob, ``tpm2_load`` + ``tpm2_unseal``) → loop-attach
(LOOP_CONFIGURE with direct I/O, no process) → luks-open (``cryptsetup open
--key-slot N``, key on a pipe, no token plugins) → inner-fsck (superblock
probe, ``e2fsck -p``) → mount-encrypted → (reseal-finish) → measure-pcr15.

Refusals are stops, never repairs: a damaged header copy, a file system that
is not there or fails its check. Nothing is written to the image before it is
open and checked; on every failure what was set up is torn down again. Only
two things write the header, both after the image opened: a successful recovery
unlock re-seals the TPM keyslot, and a re-seal a power cut interrupted is
finished (initrd/reseal.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pystate_initrd.config import Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import dm_table, luks2, recovery, tpm2_policy
from pystate_initrd.formats.names import DM_NAME, DM_PATH
from pystate_initrd.formats.token import TokenError, pystate_tokens, usable_token
from pystate_initrd.initrd import reseal
from pystate_initrd.report import BootReport
from pystate_initrd.secret import Secret
from pystate_initrd.system import devmapper, loopdev, luks, tpm2
from pystate_initrd.volume import binding, hooks, stack

# ask(prompt, attempt) -> the typed text in a bytearray (caller wipes), None: nobody there.
Ask = Callable[[str, int], bytearray | None]


class UnlockError(PystateError):
    """encrypted.img could not be opened: a damaged header, no key that opens it."""


# --- pieces -------------------------------------------------------------------------------


def check_header(image: Path) -> luks2.Luks2Header:
    """The LUKS2 header, refused unless both copies are intact (cryptsetup would "repair")."""
    try:
        header = luks.read_header(image)
    except luks.LuksError as exc:
        raise UnlockError(
            f"{image}: {exc}",
            hint="nothing was changed; boot with pystate=0 to reach the system without it",
        ) from None
    if not (header.primary_ok and header.secondary_ok):
        which = "primary" if not header.primary_ok else "secondary"
        raise UnlockError(
            f"the {which} copy of the LUKS2 header of {image} is damaged; not opening it",
            hint=f"nothing was changed; check the disk, then 'cryptsetup repair {image}'",
        )
    return header


def volume_key_source(loop: str, key: bytearray, slot: int, log: Any) -> Callable[[], bytearray]:
    """How to get the opened image's volume key (caller wipes): from the dm table, no
    process; a mapping in the keyring has none there, so cryptsetup dumps it from the slot."""

    def get() -> bytearray:
        try:
            return devmapper.dm_volume_key()
        except dm_table.DmTableError as exc:
            log.debug(f"{exc}; dumping the volume key with cryptsetup")
            return luks.volume_key(loop, key=key, key_slot=slot)

    return get


# --- the whole unlock ---------------------------------------------------------------------


def _recover(loop: str, image: Path, ask: Ask, cfg: Config, reason: str, log: Any) -> bytearray:
    """Ask for the recovery key up to cfg.recovery_tries times; the passphrase that opened it."""
    log.warning(f"the TPM did not unlock {image}: {reason}")
    tries = cfg.recovery_tries
    for attempt in range(1, tries + 1):
        prompt = f"pystate: recovery key for {image} (try {attempt} of {tries}):"
        typed = ask(prompt, attempt)
        if typed is None:
            break
        try:
            passphrase = recovery.recovery_passphrase(typed.decode("ascii", errors="replace"))
        except recovery.RecoveryKeyError as exc:
            log.error(f"not a recovery key: {exc}")
            continue
        finally:
            typed[:] = bytes(len(typed))
        try:
            luks.open(
                loop,
                key=passphrase,
                key_slot=luks.RECOVERY_KEYSLOT,
                no_write_workqueue=cfg.no_write_workqueue,
            )
        except luks.BadKey:
            passphrase[:] = bytes(len(passphrase))
            log.error(f"that recovery key does not open {image}")
            continue
        except luks.LuksError:
            passphrase[:] = bytes(len(passphrase))
            raise
        return passphrase
    raise UnlockError(
        f"the TPM did not unlock {image} ({reason}) and no valid recovery key was given",
        hint="nothing was changed; reboot to try again, or boot with pystate=0",
    )


def _flags(cfg: Config) -> str:
    return ", no_write_workqueue" if cfg.no_write_workqueue else ""


def unlock(
    cfg: Config,
    image: Path,
    mountpoint: Path,
    report: BootReport,
    *,
    ask: Ask,
    tcti: str | None = None,
    read_only: bool = False,
    event_log: str | None = None,
    hook: hooks.Hook = hooks.no_hook,
) -> stack.Opened:
    """Open, check and mount image at mountpoint; the TPM first, then the recovery key.

    When the TPM refuses on a PCR mismatch, the reason given (console, boot.json's
    ``tpm2_refusal``) says which PCRs changed since sealing and, from the firmware's
    event log (`event_log`, default tpm2.EVENT_LOG), which events (binding.diagnose_mismatch).
    """
    log = report.log
    with report.step("luks-header") as s:
        header = check_header(image)
        s.detail = f"LUKS2 {header.uuid}"

    secret: bytearray | None = None
    token: tuple[int, tpm2_policy.SealedKey, int] | None = None
    reason = ""
    with report.step("unseal") as s:
        try:
            token = usable_token(luks2.token_dicts(header.metadata))
            tpm2.wait_for_tpm(tcti)
            secret = tpm2.unseal(token[1], tcti=tcti)
            s.detail = f"token {token[0]} ({token[1].pcr_spec}) -> keyslot {token[2]}"
        except (tpm2.Tpm2Error, TokenError) as exc:
            reason = str(exc)
            s.detail = f"failed: {reason}"
            if isinstance(exc, tpm2.PcrMismatch) and token is not None:
                # Which PCR, which firmware event: the line the console and the recovery
                # prompt's warning show; the step keeps tpm2-tools' reason (TCTI, TPM_RC) too.
                reason, record = binding.diagnose_mismatch(token[1], tcti, event_log)
                report.facts["tpm2_refusal"] = {"line": reason, **record}
                s.detail += f"; {reason}"

    loop: loopdev.LoopDevice | None = None
    opened_with: tuple[bytearray, int] | None = None
    try:
        with report.step("loop-attach") as s:
            loop = stack.attach(image, read_only=read_only)
            s.detail = f"{loop.path}{' direct-io' if loop.direct_io else ' (buffered)'}"
        if secret is not None and token is not None:
            with report.step("luks-open") as s:
                try:
                    luks.open(
                        loop.path,
                        key=secret,
                        key_slot=token[2],
                        readonly=read_only,
                        no_write_workqueue=cfg.no_write_workqueue,
                    )
                    opened_with = (secret, token[2])
                    s.detail = f"keyslot {token[2]} as {DM_NAME}{_flags(cfg)}"
                except (luks.BadKey, luks.NoKeyslot) as exc:
                    reason = f"the unsealed key does not open keyslot {token[2]}: {exc}"
                    s.detail = f"failed: {reason}"
        how = "tpm2"
        if opened_with is None:
            with report.step("recovery") as s:
                passphrase = _recover(loop.path, image, ask, cfg, reason, log)
                opened_with = (passphrase, luks.RECOVERY_KEYSLOT)
                s.detail = f"recovery key, keyslot {luks.RECOVERY_KEYSLOT}{_flags(cfg)}"
            how = "recovery"
        undo_area = None
        if not read_only:
            # A shrink that a crash cut off is rolled back before anything checks or
            # mounts the file system (docs/resize.md); e2undo leaves it marked for e2fsck.
            # Its undo file is in an area keyed from the volume key (volume/scratch.py).
            from pystate_initrd.initrd import offline_shrink
            from pystate_initrd.volume.scratch import EncryptedScratch

            get_key = volume_key_source(loop.path, opened_with[0], opened_with[1], log)
            undo_area = EncryptedScratch(image.parent, get_key)
            offline_shrink.recover_interrupted_shrink(
                image.parent, DM_PATH, report, luks_uuid=header.uuid, undo_area=undo_area
            )
        with report.step("inner-fsck") as s:
            fstype, verdict = stack.check_inner(read_only)
            s.detail = f"{fstype}: {verdict}"
        if fstype == "ext4" and not read_only:
            # A shrink the resize service asked for (docs/resize.md), before the mount.
            from pystate_initrd.initrd import offline_shrink

            offline_shrink.apply_pending_shrink(
                cfg, image.parent, loop.path, report, undo_area=undo_area
            )
        with report.step("mount-encrypted") as s:
            stack.mount_inner(mountpoint, fstype, read_only=read_only)
            s.detail = f"{DM_PATH} on {mountpoint}"
    except BaseException:
        for buf in (secret, opened_with[0] if opened_with else None):
            if buf is not None:
                buf[:] = bytes(len(buf))
        stack.teardown(loop.path if loop else None, None)
        raise

    key, slot = opened_with
    try:
        adopted = False
        if not read_only and reseal.has_records(header):
            # Before PCR 15 moves: the proof unseals the cut-off re-seal's blob.
            with report.step("reseal-finish") as s:
                try:
                    finished = reseal.finish_interrupted(loop.path, tcti, log)
                    adopted = finished.adopted
                    s.detail = "; ".join(finished.lines)
                except (tpm2.Tpm2Error, luks.LuksError, TokenError) as exc:
                    s.detail = f"not finished: {exc}"
                    log.warning(f"could not finish an earlier re-seal: {exc}")
        if cfg.measure_pcr15:
            with report.step("measure-pcr15") as s:
                try:
                    with Secret(volume_key_source(loop.path, key, slot, log)()) as vk:
                        binding.extend_pcr15(vk.value, header.uuid, str(cfg.pcr_bank), tcti)
                    s.detail = f"PCR 15 ({cfg.pcr_bank}) extended"
                except tpm2.Tpm2Error as exc:
                    # No TPM (recovery boot): nothing to protect in it either.
                    s.detail = f"not measured: {exc}"
                    log.warning(f"PCR 15 not extended: {exc}")
        if how == "recovery" and cfg.reseal_on_recovery and not read_only and not adopted:
            with report.step("reseal") as s:
                try:
                    header = luks.read_header(loop.path)
                    found = pystate_tokens(luks2.token_dicts(header.metadata))
                    old_id = token[0] if token else (found[0].token_id if found else None)
                    job = reseal.Reseal(cfg, loop.path, key, token, old_id, tcti)
                    s.detail = reseal.reseal(job, hook)
                except (tpm2.Tpm2Error, luks.LuksError, reseal.ResealError) as exc:
                    s.detail = f"not resealed: {exc}"
                    log.warning(f"could not seal the key to the TPM again: {exc}")
    finally:
        key[:] = bytes(len(key))
        if secret is not None:
            secret[:] = bytes(len(secret))
    return stack.Opened(
        image=image, loop=loop.path, mountpoint=mountpoint, uuid=header.uuid, how=how
    )
