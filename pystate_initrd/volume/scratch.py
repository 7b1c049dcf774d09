"""The encrypted undo area of the offline ext4 shrink: made, opened, closed, removed.

    /state/.pystate/shrink-scratch.img (sparse; No_COW on btrfs)  ->  /dev/loopN (direct I/O,
    autoclear)  ->  plain dm-crypt pystate-shrink-undo (aes-xts-plain64, 512-bit key)  ->
    a fresh small ext4, mounted on /run/pystate/shrink-undo  ->  shrink.e2undo (chattr +S)

The file is on the outer file system (SPEC §11.8), only its content is encrypted. The key is
derived from the image's volume key and the progress file's nonce (formats/shrink_scratch.py),
never stored, and handed to cryptsetup on stdin; after the open, the mapping's table is read
back and its key compared with the derived one (a cryptsetup that hashed the key file after
all would otherwise key the area differently at the next boot). Each write to the synchronous
undo file is durable through ext4, dm-crypt, the loop device and the outer file before
write(2) returns: the flush ext4 sends on a synchronous write becomes an fsync of the backing
file in the loop driver.

A ``PlainUndoDir`` (tests/test_shrink_undo.py) stands in for this on hosts without
device-mapper: the offline shrink only needs an ``UndoArea``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import dm_table, shrink_scratch
from pystate_initrd.formats.names import META_DIR, SCRATCH_DM_NAME, SHRINK_SCRATCH
from pystate_initrd.secret import Secret
from pystate_initrd.system import beneath, block, devmapper, loopdev, luks, mount_api
from pystate_initrd.system.run import CommandError, run

MOUNTPOINT = Path("/run/pystate/shrink-undo")
SCRATCH_DEV = f"/dev/mapper/{SCRATCH_DM_NAME}"
_MOUNT_FLAGS = mount_api.MS_NOSUID | mount_api.MS_NODEV | mount_api.MS_NOEXEC
# noinit_itable: no lazy zeroing of inode tables, which would fill the sparse file.
_MOUNT_DATA = "noinit_itable"


class ScratchError(PystateError):
    """The undo area could not be made or opened (with why)."""


class UndoArea(Protocol):
    """Where resize2fs's undo file lives while a shrink is under way (offline_shrink.py)."""

    def exists(self) -> bool: ...
    def make(self, nonce: bytes, size: int) -> Path: ...  # a new, empty area: its directory
    def open(self, nonce: bytes) -> Path: ...  # the existing area: its directory
    def close(self) -> None: ...  # unmount etc.; the area stays
    def remove(self) -> int: ...  # close and delete; the bytes it took on /state
    def describe(self) -> str: ...


def volume_key_from_table() -> bytearray:
    """The opened image's volume key, from its dm table (the boot opens it without keyring)."""
    return devmapper.dm_volume_key()


class EncryptedScratch:
    """The undo area of a real boot: a dm-crypt mapping over a file on /state."""

    def __init__(
        self,
        state_dir: Path,
        volume_key: Callable[[], bytearray] = volume_key_from_table,
        mountpoint: Path = MOUNTPOINT,
    ) -> None:
        self.state_dir, self.volume_key, self.mountpoint = state_dir, volume_key, mountpoint

    def describe(self) -> str:
        return f"{self.state_dir / META_DIR / SHRINK_SCRATCH} (dm-crypt {SCRATCH_DM_NAME})"

    def _dir_fd(self, create: bool) -> int | None:
        try:
            return beneath.open_subdir(self.state_dir, META_DIR, create=create)
        except OSError as exc:
            raise ScratchError(f"{self.state_dir / META_DIR}: {exc.strerror}") from None

    def exists(self) -> bool:
        dir_fd = self._dir_fd(create=False)
        if dir_fd is None:
            return False
        try:
            os.stat(SHRINK_SCRATCH, dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)

    def make(self, nonce: bytes, size: int) -> Path:
        self.close()
        dir_fd = self._dir_fd(create=True)
        assert dir_fd is not None
        try:
            _unlink(dir_fd)
            fd = os.open(
                SHRINK_SCRATCH,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
            try:
                block.set_nocow(fd)  # btrfs: overwritten in place, as the image (SPEC §11.11)
                os.ftruncate(fd, size)  # sparse: /state pays only for what is written
                os.fsync(fd)
                os.fsync(dir_fd)
                self._map(fd, nonce)
            finally:
                os.close(fd)
        except OSError as exc:
            self._fail(dir_fd)
            raise ScratchError(f"making the undo area failed: {exc.strerror or exc}") from None
        except ScratchError:
            self._fail(dir_fd)
            raise
        finally:
            os.close(dir_fd)
        try:
            run(shrink_scratch.mkfs_argv(SCRATCH_DEV))
            return self._mount()
        except (CommandError, ScratchError) as exc:
            self.remove()
            raise ScratchError(f"making the undo area's file system failed: {exc}") from None

    def open(self, nonce: bytes) -> Path:
        self.close()
        dir_fd = self._dir_fd(create=False)
        if dir_fd is None:
            raise ScratchError("there is no undo area")
        try:
            try:
                fd = os.open(
                    SHRINK_SCRATCH, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=dir_fd,
                )  # fmt: skip
            except OSError as exc:
                raise ScratchError(f"the undo area cannot be opened: {exc.strerror}") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ScratchError("the undo area is not a regular file")
                self._map(fd, nonce)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)
        return self._mount()

    def _map(self, fd: int, nonce: bytes) -> None:
        """loop (autoclear: gone with the mapping) -> plain dm-crypt with the derived key."""
        try:
            loop = loopdev.loop_attach(f"/proc/self/fd/{fd}", direct_io=True, autoclear=True)
        except OSError as exc:
            raise ScratchError(f"attaching the undo area failed: {exc.strerror}") from None
        try:
            with Secret(self.volume_key()) as vk:
                key = Secret(shrink_scratch.derive_key(vk.value, nonce))
            with key:
                try:
                    run(shrink_scratch.open_argv(loop.path, SCRATCH_DM_NAME), input=key.value)
                except CommandError as exc:
                    raise ScratchError(f"opening the undo area failed: {exc}") from None
                try:
                    got = Secret(devmapper.dm_volume_key(SCRATCH_DM_NAME))
                except dm_table.DmTableError as exc:
                    self.close()
                    raise ScratchError(
                        f"the undo area's mapping cannot be checked: {exc}"
                    ) from None
                with got:
                    if not hmac.compare_digest(got.value, key.value):
                        self.close()
                        raise ScratchError(
                            "cryptsetup keyed the undo area with another key than the one "
                            "given (a hashed key file?): not using it"
                        )
        finally:
            loop.close()  # the mapping (if any) holds the loop device now

    def _mount(self) -> Path:
        self.mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            mount_api.mount(SCRATCH_DEV, str(self.mountpoint), "ext4", _MOUNT_FLAGS, _MOUNT_DATA)
        except OSError as exc:
            self.close()
            raise ScratchError(
                f"the undo area does not mount ({exc.strerror}): not made with this image's "
                "key for this shrink, or damaged"
            ) from None
        return self.mountpoint

    def close(self) -> None:
        if os.path.ismount(self.mountpoint):
            mount_api.umount2(str(self.mountpoint))
        if os.path.exists(SCRATCH_DEV):
            luks.close(SCRATCH_DM_NAME)  # the loop device goes with it (autoclear)

    def _fail(self, dir_fd: int) -> None:
        with contextlib.suppress(OSError, PystateError):
            self.close()
        with contextlib.suppress(OSError):
            _unlink(dir_fd)

    def remove(self) -> int:
        """Close and unlink the file: its content is ciphertext under a key that exists
        nowhere (derived, never stored), so it is not overwritten first."""
        self.close()
        dir_fd = self._dir_fd(create=False)
        if dir_fd is None:
            return 0
        try:
            try:
                taken = os.stat(SHRINK_SCRATCH, dir_fd=dir_fd, follow_symlinks=False).st_blocks
            except FileNotFoundError:
                return 0
            _unlink(dir_fd)
            os.fsync(dir_fd)
            return taken * 512
        finally:
            os.close(dir_fd)


def _unlink(dir_fd: int) -> None:
    try:
        os.unlink(SHRINK_SCRATCH, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        import shutil

        shutil.rmtree(SHRINK_SCRATCH, dir_fd=dir_fd)
