"""Checking a file system before it is mounted, with fsck(8) exit-status semantics.

ext4 is checked with ``e2fsck -p`` (preen: fix what is safe, stop otherwise).
btrfs and xfs have no offline preen check: their fsck helpers are no-ops by
design and the journal/log is replayed at mount time, so they are not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import run


class FsckError(PystateError):
    """The file system has errors that need a person, or needs a reboot first."""


class Verdict(StrEnum):
    CLEAN = "clean"
    CORRECTED = "corrected"
    REBOOT = "reboot"  # fsck fixed the root-mounted fs; not expected for state, treated as stop
    FAILED = "failed"


@dataclass(frozen=True)
class FsckResult:
    verdict: Verdict
    status: int
    output: str


def verdict_for_status(status: int) -> Verdict:
    """fsck(8): 0 clean, 1 corrected, 2 reboot needed, 4 and above errors left or failed."""
    if status == 0:
        return Verdict.CLEAN
    if status == 1:
        return Verdict.CORRECTED
    if status in (2, 3):
        return Verdict.REBOOT
    return Verdict.FAILED


def check(device: str, fstype: str) -> FsckResult:
    """Check device; raise FsckError unless it may be mounted read-write."""
    if fstype != "ext4":
        return FsckResult(Verdict.CLEAN, 0, f"no preen check for {fstype}; log replays at mount")
    proc = run(["e2fsck", "-p", device], check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    verdict = verdict_for_status(proc.returncode)
    if verdict is Verdict.REBOOT:
        raise FsckError(
            f"e2fsck -p {device} exited {proc.returncode}: the system must be rebooted",
            hint="reboot; if it repeats, run e2fsck by hand from the emergency shell",
        )
    if verdict is Verdict.FAILED:
        last = output.splitlines()[-1] if output else "no output"
        raise FsckError(
            f"e2fsck -p {device} exited {proc.returncode}, errors left: {last}",
            hint=f"run 'e2fsck {device}' from the emergency shell; nothing was mounted",
        )
    return FsckResult(verdict, proc.returncode, output)
