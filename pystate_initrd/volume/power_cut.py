"""Power cuts at a named step, for the crash tests (SPEC §6, §7).

A word on the trusted kernel command line (``pystate.debug-stop=STEP`` for provisioning,
``pystate.debug-resize-stop=STEP`` for the offline shrink) or the service's hidden
``--debug-stop`` names a step; right after it, the hook has the kernel power off at once
(sysrq ``o``: no sync, no unmount), which is what a power cut leaves on the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pystate_initrd.formats.cmdline import parse_cmdline

Hook = Callable[[str], None]  # called with each step's name once the step is done


def no_hook(step: str) -> None:
    pass


def power_cut_hook(stop_at: str | None, say: Callable[[str], None]) -> Hook:
    """A hook that cuts the power right after step stop_at; no_hook when stop_at is None."""

    def hook(step: str) -> None:
        if step != stop_at:
            return
        say(f"debug-stop after {step}: cutting the power now")
        time.sleep(0.5)  # let the console show the line
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("o")
        time.sleep(60)

    return hook if stop_at else no_hook


def debug_word(cmdline: str, word: str) -> str | None:
    """The value of a test word on the kernel command line (the last one wins), or None."""
    return dict(parse_cmdline(cmdline)).get(word)
