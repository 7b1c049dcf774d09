"""Test hooks: power cuts at a named step and PCR extends, for the QEMU crash tests.

Only in a test build (SPEC §11.10): the freeze leaves this package out of the program unless
it is built with ``--test-hooks`` (``build.py payload|initrd|zipapp --test-hooks``,
docs/testing.md), and the Debian package refuses a payload that holds it. The rest of the
program reaches it only through ``volume/hooks.py``, whose functions do nothing when this
package is absent; nothing here is consulted in a production build, whatever the command
line, the files or the environment say.

What a test boot can ask for, on the (trusted) kernel command line:

- ``pystate.debug-stop=STEP``: cut the power right after provisioning step STEP (allocate,
  luks-format, mkfs, layout, commit) or re-seal step STEP (reseal-seal, reseal-write-record,
  reseal-add-keyslot, reseal-point-token, reseal-retire-old, reseal-remove-record);
- ``pystate.debug-resize-stop=STEP``: the same after a step of the offline ext4 shrink
  (e2fsck, resize2fs, crypt-resize, truncate, loop-capacity), or
  ``resize2fs-running:SECONDS``: that many seconds after resize2fs started, while it runs;
- ``pystate.debug-extend-pcr=N``: extend PCR N with zeros before unsealing, as a firmware
  update would change it;

and on the booted system's command line ``pystate resize --debug-stop STEP`` (a step of
volume/resize.py). A power cut is sysrq ``o``: the kernel powers off at once, no sync, no
unmount, which is what a real power cut leaves on the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pystate_initrd.formats import tpm2_policy
from pystate_initrd.formats.cmdline import parse_cmdline
from pystate_initrd.system import tpm2

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start
if TYPE_CHECKING:
    import argparse

Hook = Callable[[str], None]  # called with each step's name once the step is done
Say = Callable[[str], None]

BOOT_STOP = "pystate.debug-stop"
SHRINK_STOP = "pystate.debug-resize-stop"
EXTEND_PCR = "pystate.debug-extend-pcr"
SYSRQ_TRIGGER = Path("/proc/sysrq-trigger")


def _no_hook(step: str) -> None:
    pass


def power_cut_hook(
    stop_at: str | None, say: Say, *, trigger: Path = SYSRQ_TRIGGER, wait: float = 60.0
) -> Hook:
    """A hook that cuts the power right after step stop_at; one that does nothing for None."""

    def hook(step: str) -> None:
        if step != stop_at:
            return
        say(f"debug-stop after {step}: cutting the power now")
        time.sleep(min(wait, 0.5))  # let the console show the line
        with open(trigger, "w") as f:
            f.write("o")
        time.sleep(wait)

    return hook if stop_at else _no_hook


def word(cmdline: str, name: str) -> str | None:
    """The value of a test word on the kernel command line (the last one wins), or None."""
    return dict(parse_cmdline(cmdline)).get(name)


def provision_hook(cmdline: str, say: Say) -> Hook:
    return power_cut_hook(word(cmdline, BOOT_STOP), say)


def offline_shrink_hook(cmdline: str, say: Say) -> Hook:
    stop_at = word(cmdline, SHRINK_STOP)
    if stop_at and stop_at.startswith(RUNNING):
        return resize2fs_running_hook(float(stop_at.partition(":")[2] or "1"), say)
    return power_cut_hook(stop_at, say)


RUNNING = "resize2fs-running"


def resize2fs_running_hook(delay: float, say: Say, *, trigger: Path = SYSRQ_TRIGGER) -> Hook:
    """Cut the power `delay` seconds after resize2fs started, while it runs (a thread:
    resize2fs is a child the program waits for)."""
    import threading

    def cut() -> None:
        say(f"debug-stop {RUNNING} after {delay} s: cutting the power now")
        with open(trigger, "w") as f:
            f.write("o")

    def hook(step: str) -> None:
        if step == "resize2fs-start":
            threading.Timer(delay, cut).start()

    return hook


def before_unseal(cmdline: str, bank: str, tcti: str | None, say: Say) -> None:
    value = word(cmdline, EXTEND_PCR)
    if value is None:
        return
    index = int(value)
    tpm2.pcr_extend(index, bank, bytes(tpm2_policy.bank_digest_size(bank)), tcti)
    say(f"debug: extended PCR {index} ({EXTEND_PCR})")


def add_resize_options(parser: argparse.ArgumentParser) -> None:
    import argparse

    parser.add_argument("--debug-stop", metavar="STEP", help=argparse.SUPPRESS)


def resize_hook(args: argparse.Namespace, say: Say) -> Hook:
    stop_at = getattr(args, "debug_stop", None)
    return power_cut_hook(stop_at if isinstance(stop_at, str) else None, say)
