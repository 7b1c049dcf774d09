"""The one seam between the program and its test hooks (SPEC §11.10).

Provisioning, the offline shrink and a resize call ``hook(step)`` after each of their
steps, and the encrypted area calls ``before_unseal()`` before the TPM is asked for the
key. A test build acts there (pystate_initrd/testhooks/: power cuts, PCR extends, for the
QEMU crash tests). The program a distributor ships is not a test build: the freeze leaves
testhooks/ out unless it is asked for with ``--test-hooks`` (docs/testing.md), so every
function here gives ``no_hook`` or does nothing. There is no run-time switch: the kernel
command line, a file or the environment cannot add what the zipapp does not hold (the
package's modules are found only inside the zipapp), and this module is the only one that
imports testhooks (tests/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start
if TYPE_CHECKING:
    import argparse

try:
    import pystate_initrd.testhooks as _testhooks

    TEST_BUILD = True
except ModuleNotFoundError as exc:  # a production build: not in pystate.zip
    if exc.name != "pystate_initrd.testhooks":
        raise
    TEST_BUILD = False

Hook = Callable[[str], None]  # called with each step's name once the step is done
Say = Callable[[str], None]


def no_hook(step: str) -> None:
    """What every step is followed by in a production build: nothing."""


def provision_hook(cmdline: str, say: Say) -> Hook:
    """The hook of provision.py's steps for a boot with this kernel command line."""
    return _testhooks.provision_hook(cmdline, say) if TEST_BUILD else no_hook


def offline_shrink_hook(cmdline: str, say: Say) -> Hook:
    """The hook of offline_shrink.py's steps for a boot with this kernel command line."""
    return _testhooks.offline_shrink_hook(cmdline, say) if TEST_BUILD else no_hook


def before_unseal(cmdline: str, bank: str, tcti: str | None, say: Say) -> None:
    """Called before encrypted.img is unlocked or provisioned; nothing in production."""
    if TEST_BUILD:
        _testhooks.before_unseal(cmdline, bank, tcti, say)


def add_resize_options(parser: argparse.ArgumentParser) -> None:
    """The test build's extra options of ``pystate resize``; none in production."""
    if TEST_BUILD:
        _testhooks.add_resize_options(parser)


def resize_hook(args: argparse.Namespace, say: Say) -> Hook:
    """The hook of resize.py's steps for ``pystate resize``/``resized`` run with args."""
    return _testhooks.resize_hook(args, say) if TEST_BUILD else no_hook
