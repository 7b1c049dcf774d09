"""One QEMU test machine: a disk, an initrd and an swtpm state kept across its boots.

The encrypted-state and resize tests (tests/test_encrypted_qemu.py, tests/test_resize_qemu.py)
and ``build.py bench-resize`` boot one machine again and again: its TPM keeps what the first
boot sealed, its disk what every boot wrote. ``Machine.boot`` puts the root partition and the
fail-fast words on the kernel command line and writes each boot's console to
``work/console-<n>.log``; ``Machine.run`` boots the resize guest
(``bench_resize.build_guest_root``) with ``rt.run=`` commands and keeps their ``RT-<tag>``
results. Tests that build on each other record the steps that passed in ``done``; a later
test calls ``need`` and is skipped when one it builds on did not pass.

No ``register``: build.py imports it and adds no subcommand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import qemu_harness as harness
from .roots import TESTROOT_MARKER

if TYPE_CHECKING:
    from .disk import DiskLayout

# A boot that stops does not wait in an emergency shell for a password: it powers off.
FAIL_FAST = "rd.shell=0 rd.emergency=poweroff"


@dataclass
class Machine:
    """A machine booted in order; ``work`` holds its TPM state (``work/tpm``) and logs."""

    name: str
    layout: DiskLayout
    initrd: Path
    work: Path
    expect: tuple[str, ...] = (TESTROOT_MARKER,)  # markers a boot must print, by default
    timeout: float = 240  # seconds per boot
    memory: int = harness.DEFAULT_MEMORY  # MiB
    boots: int = 0
    done: set[str] = field(default_factory=set)  # steps passed, for need()
    recovery_key: str = ""  # the encrypted state's, once a boot has shown it
    results: dict[str, dict[str, object]] = field(default_factory=dict)  # run()'s, by tag
    # UEFI: OVMF boots the disk's ESP (uefi.py); the command line is the UKI's, so boot()
    # takes no words. The variable store is work/efivars.fd, beside the TPM state.
    uefi: harness.Uefi | None = None
    boot_disk: int = 0  # with uefi: which of the disks the firmware boots
    cache: str = "unsafe"  # the disk's QEMU cache mode (build.py torture: writeback)

    @property
    def efi_vars(self) -> Path:
        """The variable store the harness keeps for this machine (beside its TPM state)."""
        return harness.efi_vars_beside(self.tpm)

    @property
    def tpm(self) -> Path:
        """The swtpm state directory, shared by every boot of this machine."""
        return self.work / "tpm"

    def command_line(self, *words: str) -> str:
        root = self.layout.root
        assert root is not None, f"{self.layout.path} has no root partition"
        return " ".join(
            [f"root=PARTUUID={root.uuid} rootfstype=erofs ro quiet {FAIL_FAST}", *words]
        )

    def boot(
        self,
        *words: str,
        tpm: bool = True,
        answers: Sequence[str] = (),
        expect: Sequence[str] | None = None,
        disk: Path | Sequence[Path] | None = None,
        tpm_trace: Path | None = None,
        kill_after: harness.KillAfter | None = None,
        blkdebug: Mapping[int, Path] | None = None,
        tpm_proxy: harness.TpmProxy | None = None,
    ) -> harness.BootResult:
        """Boot once, ``words`` added to the kernel command line; ``disk`` boots another
        image (a modified copy) with this machine's initrd and TPM; ``expect`` replaces the
        machine's markers (``()``: none, for a boot that must stop); ``tpm_trace`` keeps
        swtpm's log of every TPM command and response; ``kill_after`` cuts the power at an
        instant (harness.KillAfter); ``blkdebug`` and ``tpm_proxy`` inject faults
        (harness.boot)."""
        if self.uefi is not None and words:
            raise ValueError(f"machine {self.name} boots a UKI: its command line is fixed")
        self.boots += 1
        uefi = self.uefi is not None
        return harness.boot(
            disk or self.layout.path,
            initrd=None if uefi else self.initrd,
            append="" if uefi else self.command_line(*words),
            uefi=self.uefi,
            boot_disk=self.boot_disk,
            tpm=tpm,
            tpm_state=self.tpm,
            answers=answers,
            expect=self.expect if expect is None else expect,
            timeout=self.timeout,
            memory=self.memory,
            log=self.work / f"console-{self.boots}.log",
            tpm_trace=tpm_trace,
            cache=self.cache,
            kill_after=kill_after,
            blkdebug=blkdebug,
            tpm_proxy=tpm_proxy,
        )

    def run(
        self,
        commands: str,
        *tags: str,
        words: Sequence[str] = (),
        **boot: Any,
    ) -> harness.BootResult:
        """Boot the resize guest with ``rt.run=commands`` (``CMD,ARG…;CMD…``); the last
        ``RT-<tag>`` result of each tag goes to ``results`` (AssertionError when missing);
        ``boot``: more keywords for ``boot()`` (answers, expect, kill_after)."""
        from .bench_resize import rt_result

        result = self.boot(f"rt.run={commands}", *words, **boot)
        for tag in tags:
            value = rt_result(result.console, tag)
            assert value is not None, f"no RT-{tag}\n{harness.describe(result)}"
            self.results[tag] = value
        return result

    def need(self, *steps: str) -> None:
        """In a test: skip it unless every one of ``steps`` is in ``done``."""
        import pytest

        missing = [s for s in steps if s not in self.done]
        if missing:
            pytest.skip(f"machine {self.name}: {', '.join(missing)} did not pass")
