"""Growing the outer file system to fill its partition (GPT attribute bit 59)."""

from __future__ import annotations

from pathlib import Path

from pystate_initrd.system.run import run


def grow(device: str, fstype: str, mountpoint: Path) -> str:
    """Grow the mounted file system online to the size of its partition."""
    if fstype == "ext4":
        run(["resize2fs", device])
    elif fstype == "btrfs":
        run(["btrfs", "filesystem", "resize", "max", str(mountpoint)])
    elif fstype == "xfs":
        run(["xfs_growfs", str(mountpoint)])
    return f"{fstype} on {device} grown to fill its partition"
