"""Seeding a new entry: copy what the OS image has at a target into the entry (SPEC §6).

The copy keeps owners, modes, timestamps, hard links, xattrs and ACLs. It is
coreutils ``cp`` (the initrd carries it anyway; busybox cp drops xattrs):

    cp --recursive --no-dereference --no-target-directory --one-file-system
       --preserve=mode,ownership,timestamps,links,xattr SOURCE DEST

``mode`` brings the ACLs along (cp copies them with the mode bits), ``xattr``
the rest (security.*, trusted.*, user.*). The preserve list is explicit, not
``all``: with ``all`` cp ignores a failure to copy xattrs, and a silently lost
security label or capability is worse than a stopped first boot.
``--no-target-directory`` merges SOURCE into the existing (empty) DEST and gives
DEST SOURCE's own owner, mode and times; ``--one-file-system`` stays off
anything mounted below the source.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import CommandError, run

CP_ARGV = (
    "cp",
    "--recursive",
    "--no-dereference",
    "--no-target-directory",
    "--one-file-system",
    "--preserve=mode,ownership,timestamps,links,xattr",
)


class SeedError(PystateError):
    """The image's content could not be copied into a new entry."""


def seed_argv(source: Path, dest: Path) -> list[str]:
    return [*CP_ARGV, str(source), str(dest)]


def has_content(source: Path) -> bool:
    """Whether source is a real directory (not a symlink) worth copying."""
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode)


def seed(source: Path, dest: Path) -> bool:
    """Copy source's tree into the directory dest; False when there is nothing to copy.

    dest must exist and be empty (a freshly made entry). A source that is a
    symlink or not a directory is not followed: the entry stays empty.
    """
    if not has_content(source):
        return False
    if any(os.scandir(dest)):
        raise SeedError(f"seeding {dest} from {source}: the entry is not empty, refusing")
    try:
        run(seed_argv(source, dest))
    except CommandError as exc:
        raise SeedError(
            f"copying {source} into {dest} failed: {exc}",
            hint="the first boot stops here; the unfinished image is removed at the next boot",
        ) from None
    return True
