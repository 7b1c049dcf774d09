"""First boot (and factory reset): build encrypted.img from nothing (SPEC §6).

Everything is made in ``encrypted.img.new``; only when it is complete and on
disk is it renamed to ``encrypted.img`` (and the directory fsynced). A power
cut at any point therefore leaves either no image or a complete one; a
leftover ``.new`` is an interrupted run, crypto-erased and deleted at the next boot.

The steps, in order (each a ``report`` step, so boot.json times them):
seal (a random 32-byte secret sealed by the TPM, before anything touches the
disk: no TPM, no image), allocate, luks-format (TPM keyslot, recovery keyslot,
``pystate-tpm2`` token), mkfs, layout (entries, seeded from the OS image;
``.pystate/recovery-key``, mode 0400), commit (fsync, rename, fsync dir).
The image is left open and mounted: the caller goes on as after an unlock.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.config import Allocation, Area, Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import recovery, resize_policy, tpm2_policy
from pystate_initrd.formats.escape import escape_path
from pystate_initrd.formats.names import (
    DM_PATH,
    IMAGE,
    META_DIR,
    MOUNT_DIR,
    NEW_IMAGE,
    RECOVERY_FILE,
)
from pystate_initrd.formats.resize_policy import human_size
from pystate_initrd.formats.token import encode_token_json
from pystate_initrd.initrd import seed
from pystate_initrd.report import BootReport
from pystate_initrd.secret import Secret, new_recovery_key
from pystate_initrd.system import block, luks
from pystate_initrd.system.run import CommandError, run
from pystate_initrd.volume import binding, hooks, stack
from pystate_initrd.volume.policy import params_from_config

HEADER_SIZE = 16 * 1024 * 1024  # cryptsetup 2.6's default LUKS2 header (both copies + slots)
FS_LABEL = "pystate"


class ProvisionError(PystateError):
    """encrypted.img could not be made."""


# --- pure ---------------------------------------------------------------------------------


# --- files --------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crypto_erase(path: Path) -> bool:
    """``cryptsetup erase`` of a LUKS file: every keyslot destroyed, so that no key, the
    recovery key included, opens its data again; False when it is not LUKS (nothing to do)."""
    try:
        luks.erase(path)
    except luks.NotLuks:
        return False
    return True


def remove_leftover(state_dir: Path) -> str | None:
    """Delete an interrupted provisioning's encrypted.img.new; what was done, None: nothing.

    A leftover may already carry keyslots (TPM and recovery: luksFormat and luksAddKey ran),
    so a LUKS one is crypto-erased first, as a factory reset erases encrypted.img: deleting
    the file alone would leave its header on the disk's free blocks.
    """
    new = state_dir / NEW_IMAGE
    try:
        st = os.lstat(new)
    except FileNotFoundError:
        return None
    erased = stat.S_ISREG(st.st_mode) and crypto_erase(new)
    try:
        os.unlink(new)  # a file, a symlink: the name goes, nothing is followed
    except IsADirectoryError:
        import shutil  # here, not at the top: every boot imports this module (2 ms)

        shutil.rmtree(new)
    fsync_dir(state_dir)
    how = "crypto-erased and deleted" if erased else "deleted"
    return f"{how} {NEW_IMAGE} of an interrupted first boot"


def allocate(path: Path, size: int, allocation: Allocation) -> bool:
    """Create path (it must not exist) with size bytes: fully allocated, or sparse; whether
    it was made No_COW.

    On a btrfs outer file system the file is made No_COW (chattr +C) while it is still
    empty (SPEC §11.11): a copy-on-write file's blocks are allocated anew at every write,
    so fallocate could not keep its promise that a write inside the image never meets a
    full outer file system. Grows extend the same file, and the offline shrink truncates
    it, so the flag stays.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            nocow = block.set_nocow(fd)
        except OSError as exc:
            raise ProvisionError(
                f"cannot make {path} No_COW (chattr +C) on the btrfs state file system: "
                f"{exc.strerror}",
                hint="without it the image is not fully allocated (SPEC §11.11)",
            ) from None
        if allocation is Allocation.FULL:
            try:
                block.fallocate(fd, 0, 0, size)
            except OSError as exc:
                raise ProvisionError(
                    f"allocating {human_size(size)} for {path} failed: {exc.strerror}"
                ) from None
        else:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return nocow


def write_recovery_key(inner_root: Path, key_text: str) -> Path:
    """.pystate/recovery-key inside the image: the key and a line on its use, mode 0400."""
    meta = inner_root / META_DIR
    meta.mkdir(mode=0o700, exist_ok=True)
    os.chmod(meta, 0o700)
    path = meta / RECOVERY_FILE
    text = (
        f"{key_text}\n"
        "# pystate recovery key for this encrypted.img (LUKS2 keyslot "
        f"{luks.RECOVERY_KEYSLOT}).\n"
        "# Keep it somewhere safe, then delete this file. It is asked for when the TPM\n"
        "# cannot unlock the image (firmware update, other machine, no TPM).\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o400)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def mkfs_argv(device: str, fstype: str) -> list[str]:
    if fstype == "btrfs":
        return ["mkfs.btrfs", "--quiet", "--label", FS_LABEL, device]
    # 1 % reserved for root (not 5 %): the image is resized to its use anyway.
    return ["mkfs.ext4", "-q", "-F", "-L", FS_LABEL, "-m", "1", device]


def make_layout(
    cfg: Config, inner_root: Path, state_dir: Path, sysroot: Path
) -> list[tuple[str, str, bool]]:
    """Create the default layout's entries; (area, target, seeded) for each created."""
    done = []
    for entry in cfg.layout:
        name = escape_path(entry.target)
        parent = inner_root if entry.area is Area.ENCRYPTED else state_dir
        path = parent / name
        if entry.area is Area.PLAIN and (path.exists() or path.is_symlink()):
            continue  # plain entries survive; a factory reset removes them first
        path.mkdir(mode=0o755)
        seeded = False
        if entry.seed:
            seeded = seed.seed(sysroot / entry.target.lstrip("/"), path)
        done.append((str(entry.area), entry.target, seeded))
    return done


def format_image(
    image: Path,
    *,
    secret: bytearray,
    volume_key: bytearray,
    recovery_pass: bytearray,
    sealed: tpm2_policy.SealedKey,
) -> str:
    """LUKS2 on image: TPM keyslot, recovery keyslot, pystate-tpm2 token; its UUID."""
    luks.format(image, key=secret, volume_key=volume_key, key_slot=luks.TPM2_KEYSLOT)
    luks.add_keyslot(
        image,
        existing_key=secret,
        existing_slot=luks.TPM2_KEYSLOT,
        new_key=recovery_pass,
        slot=luks.RECOVERY_KEYSLOT,
    )
    luks.token_import(image, encode_token_json(sealed, luks.TPM2_KEYSLOT))
    return luks.uuid(image)


# --- the whole run ------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    opened: stack.Opened
    size: int
    layout: list[tuple[str, str, bool]]


def provision(
    cfg: Config,
    state_dir: Path,
    sysroot: Path,
    report: BootReport,
    *,
    tcti: str | None = None,
    hook: hooks.Hook = hooks.no_hook,
) -> Provisioned:
    """Make, fill and commit encrypted.img; it is left open and mounted at state_dir/encrypted."""
    new, final = state_dir / NEW_IMAGE, state_dir / IMAGE
    with contextlib.ExitStack() as held:
        secret = held.enter_context(Secret.random(32))
        volume_key = held.enter_context(Secret.random(luks.KEY_BITS // 8))
        recovery_text = new_recovery_key()
        recovery_pass = held.enter_context(Secret(recovery.recovery_passphrase(recovery_text)))

        with report.step("seal") as s:
            sealed = binding.seal(cfg, secret.value, tcti)
            s.detail = f"to {sealed.pcr_spec}"
        with report.step("allocate") as s:
            st = os.statvfs(state_dir)
            size = resize_policy.initial_size(
                st.f_blocks * st.f_frsize,
                st.f_bavail * st.f_frsize,
                HEADER_SIZE,
                params_from_config(cfg),
            )
            nocow = allocate(new, size, cfg.allocation)
            s.detail = f"{new} {human_size(size)} ({cfg.allocation}{', No_COW' if nocow else ''})"
        hook("allocate")
        with report.step("luks-format") as s:
            uuid = format_image(
                new,
                secret=secret.value,
                volume_key=volume_key.value,
                recovery_pass=recovery_pass.value,
                sealed=sealed,
            )
            s.detail = f"LUKS2 {uuid}, keyslots {luks.TPM2_KEYSLOT} (tpm2), 1 (recovery)"
        hook("luks-format")
        with report.step("mkfs") as s:
            loop = stack.attach(new)
            # Undone on failure only; kept (pop_all) once committed. The secrets are
            # wiped by the outer ExitStack either way.
            undo = held.enter_context(contextlib.ExitStack())
            undo.callback(stack.teardown, loop.path, state_dir / MOUNT_DIR)
            luks.open(
                loop.path,
                key=secret.value,
                key_slot=luks.TPM2_KEYSLOT,
                no_write_workqueue=cfg.no_write_workqueue,
            )
            try:
                run(mkfs_argv(DM_PATH, str(cfg.inner_fs)))
            except CommandError as exc:
                raise ProvisionError(f"making the encrypted file system failed: {exc}") from None
            s.detail = f"{cfg.inner_fs} on {DM_PATH}"
        hook("mkfs")
        with report.step("layout") as s:
            mountpoint = stack.mount_inner(state_dir / MOUNT_DIR, str(cfg.inner_fs))
            os.chmod(mountpoint, 0o755)
            layout = make_layout(cfg, mountpoint, state_dir, sysroot)
            write_recovery_key(mountpoint, recovery_text)
            seeded = [t for _, t, did in layout if did]
            s.detail = ", ".join(f"{a} {t}" for a, t, _ in layout) + (
                f"; seeded {', '.join(seeded)}" if seeded else ""
            )
        hook("layout")
        with report.step("commit") as s:
            os.sync()  # the inner file system's data and metadata down to the image file
            fd = os.open(new, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(new, final)
            fsync_dir(state_dir)
            s.detail = f"{new.name} -> {final.name}"
        hook("commit")
        undo.pop_all()  # committed: keep loop, mapping and mount
        opened = stack.Opened(
            image=final, loop=loop.path, mountpoint=mountpoint, uuid=uuid, how="provisioned"
        )
        if cfg.measure_pcr15:
            with report.step("measure-pcr15") as s:
                binding.extend_pcr15(volume_key.value, uuid, str(cfg.pcr_bank), tcti)
                s.detail = f"PCR 15 ({cfg.pcr_bank}) extended with the volume's measurement"
        return Provisioned(opened=opened, size=size, layout=layout)
    raise AssertionError("unreachable")
