"""The test build's hooks (pystate_initrd/testhooks/) and their seam (volume/hooks.py), from
the checkout, which holds them. The trigger is a file here, never /proc/sysrq-trigger. That
the shipped program holds none of this: test_build.py, test_boot_host.py, test_deb.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pystate_initrd import cli, testhooks
from pystate_initrd.volume import hooks


def _hook(tmp_path: Path, stop_at: str | None) -> tuple[testhooks.Hook, list[str], Path]:
    said: list[str] = []
    trigger = tmp_path / "sysrq-trigger"
    trigger.write_text("")
    return testhooks.power_cut_hook(stop_at, said.append, trigger=trigger, wait=0), said, trigger


@pytest.mark.parametrize(
    ("stop_at", "steps", "cut_after"),
    [
        ("allocate", ["allocate"], "allocate"),
        ("commit", ["allocate", "layout"], None),  # never reached: no cut
        (None, ["allocate", "commit"], None),
        ("", ["allocate"], None),
    ],
)
def test_power_cut_hook_cuts_after_its_step_only(
    tmp_path: Path, stop_at: str | None, steps: list[str], cut_after: str | None
) -> None:
    hook, said, trigger = _hook(tmp_path, stop_at)
    for step in steps:
        hook(step)
    if cut_after is None:
        assert (said, trigger.read_text()) == ([], "")
    else:
        assert said == [f"debug-stop after {cut_after}: cutting the power now"]
        assert trigger.read_text() == "o"


@pytest.mark.parametrize(
    ("cmdline", "name", "expected"),
    [
        ("quiet pystate.debug-stop=layout", testhooks.BOOT_STOP, "layout"),
        ("pystate.debug-stop=a pystate.debug-stop=b", testhooks.BOOT_STOP, "b"),  # last wins
        ("pystate.debug-stop=a", testhooks.SHRINK_STOP, None),
        ("pystate.debug-resize-stop=e2fsck", testhooks.SHRINK_STOP, "e2fsck"),
        ("pystate.debug-extend-pcr=7", testhooks.EXTEND_PCR, "7"),
        ("", testhooks.EXTEND_PCR, None),
    ],
)
def test_word(cmdline: str, name: str, expected: str | None) -> None:
    assert testhooks.word(cmdline, name) == expected


def test_the_checkout_is_a_test_build() -> None:
    assert hooks.TEST_BUILD
    assert hooks.provision_hook("quiet", print) is not hooks.no_hook  # a hook that never cuts


def test_seam_gives_no_hook_without_a_word() -> None:
    say: list[str] = []
    hooks.provision_hook("quiet", say.append)("allocate")
    hooks.offline_shrink_hook("quiet", say.append)("e2fsck")
    hooks.before_unseal("quiet", "sha256", "device:/dev/nonexistent-tpm", say.append)
    assert say == []


def test_resize_option_of_a_test_build() -> None:
    args = cli._parser().parse_args(["resize", "--to", "1G", "--debug-stop", "fs-grow"])
    assert args.debug_stop == "fs-grow"
    said: list[str] = []
    args = cli._parser().parse_args(["resize", "--auto"])
    hooks.resize_hook(args, said.append)("fs-grow")  # no --debug-stop: no cut
    assert said == []


def test_resize2fs_running_cut_fires_after_the_delay(tmp_path: Path) -> None:
    # The QEMU cut inside resize2fs: a timer started by the "resize2fs-start" step.
    import time

    from pystate_initrd import testhooks

    trigger = tmp_path / "sysrq"
    said: list[str] = []
    hook = testhooks.resize2fs_running_hook(0.05, said.append, trigger=trigger)
    hook("e2fsck")
    time.sleep(0.1)
    assert not trigger.exists()
    hook("resize2fs-start")
    time.sleep(0.3)
    assert trigger.read_text() == "o"
    assert said and "resize2fs-running" in said[0]
