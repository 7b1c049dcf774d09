"""Carrying out a mount plan on the new root without following any symlink.

Sources are opened beneath the state mount and targets beneath /sysroot with
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) (or an O_NOFOLLOW walk), and
the bind is made between those file descriptors (open_tree + move_mount), so
a symlink planted anywhere along either path cannot redirect a mount into the
real root. What was mounted is remembered so a failure can undo exactly that.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.plan import Mount, MountMode
from pystate_initrd.system import beneath, mount_api

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


class MountError(PystateError):
    """A planned mount could not be made."""


@dataclass(frozen=True)
class Done:
    mount: Mount
    created_target: bool


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _open_target(root_fd: int, sysroot: Path, target: str) -> tuple[int, bool]:
    """Open the target beneath the new root, creating it where the root is writable."""
    rel = target.lstrip("/")
    try:
        return beneath.open_beneath(root_fd, rel, _O_PATH_DIR), False
    except FileNotFoundError:
        pass
    try:
        beneath.mkdir_beneath(root_fd, rel, 0o755)
        return beneath.open_beneath(root_fd, rel, _O_PATH_DIR), True
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise MountError(
                f"target {target} does not exist in {sysroot} and the image is read-only there",
                hint=f"add the directory {target} to the OS image",
            ) from None
        raise MountError(
            f"cannot create target {target} in {sysroot}: {exc.strerror}",
            hint=f"add the directory {target} to the OS image",
        ) from None


def _overlay(mount: Mount, src: int, tgt: int, area_fd: int) -> None:
    """Overlay: lower is the image's directory, upper the entry, work in <area>/.pystate/."""
    work_rel = f".pystate/overlay-work/{mount.name}"
    beneath.mkdir_beneath(area_fd, work_rel, 0o700)
    work = beneath.open_beneath(area_fd, work_rel, _O_PATH_DIR)
    with _fd(work):
        # /proc/self/fd paths pin the directories opened above without following symlinks.
        data = (
            f"lowerdir=/proc/self/fd/{tgt},upperdir=/proc/self/fd/{src},"
            f"workdir=/proc/self/fd/{work}"
        )
        mount_api.mount(
            "overlay",
            f"/proc/self/fd/{tgt}",
            "overlay",
            mount_api.mount_flags(mount.options),
            data,
        )


def apply_mount(mount: Mount, *, root_fd: int, sysroot: Path, area_fds: dict[str, int]) -> Done:
    """Make one planned mount; raise MountError naming the entry and the target."""
    area_fd = area_fds[str(mount.area)]
    try:
        src = beneath.open_beneath(area_fd, mount.name, _O_PATH_DIR)
    except OSError as exc:
        raise MountError(
            f"state entry {mount.name!r} ({mount.area}) cannot be opened safely: {exc.strerror}"
        ) from None
    with _fd(src):
        tgt_fd, created = _open_target(root_fd, sysroot, mount.target)
        with _fd(tgt_fd):
            try:
                if mount.mode is MountMode.OVERLAY:
                    _overlay(mount, src, tgt_fd, area_fd)
                else:
                    # Options are set on the detached clone, so the mount is never
                    # visible without them (nosuid,nodev on /home).
                    mount_api.bind_mount_fd(src, tgt_fd, flags=mount_api.mount_flags(mount.options))
            except OSError as exc:
                raise MountError(
                    f"{mount.mode} mount of {mount.area} entry {mount.name!r} onto "
                    f"{mount.target} failed: {exc.strerror}"
                ) from None
    return Done(mount, created)


def apply_plan(
    mounts: tuple[Mount, ...], *, sysroot: Path, area_dirs: dict[str, Path]
) -> list[Done]:
    """Make every mount in order; on failure undo the ones made, then raise."""
    done: list[Done] = []
    root_fd = os.open(sysroot, _O_PATH_DIR)
    area_fds = {area: os.open(path, _O_PATH_DIR) for area, path in area_dirs.items()}
    try:
        for mount in mounts:
            done.append(apply_mount(mount, root_fd=root_fd, sysroot=sysroot, area_fds=area_fds))
    except BaseException:
        for d in reversed(done):
            # Best effort: the boot stops anyway and nothing was written.
            with contextlib.suppress(OSError):
                mount_api.umount2(
                    str(sysroot / d.mount.target.lstrip("/")),
                    mount_api.MNT_DETACH | mount_api.UMOUNT_NOFOLLOW,
                )
        raise
    finally:
        os.close(root_fd)
        for fd in area_fds.values():
            os.close(fd)
    return done
