"""The UEFI boot chain of a test machine, in one call: UKI, ESP and firmware.

``build_uefi_boot`` makes what an image-based distribution ships: a UKI (uki.py) with the
initrd and the command line embedded, an EFI system partition with systemd-boot (esp.py),
and, with Secure Boot, both signed by the test db key and an OVMF variable store with the
test PK, KEK and db enrolled (secureboot.py). The caller puts ``esp`` on a disk
(``build_disk(..., esp=...)``) and boots it with ``qemu_harness.boot(uefi=...)``.

The command line has no ``root=``: systemd-gpt-auto-generator finds the root partition on the
disk whose ESP the boot loader came from (``LoaderDevicePartUUID``), as on a real machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import qemu_harness as harness
from .esp import SAVED, build_esp
from .kernel import ensure_kernel
from .secureboot import TestKeys, enrolled_vars, test_keys
from .uki import build_uki

ENTRY = "pystate.efi"  # the UKI's name in /EFI/Linux: systemd-boot's entry id


@dataclass(frozen=True)
class UefiBoot:
    uki: Path
    esp: Path  # the FAT image for build_disk(esp=...)
    firmware: harness.Uefi
    keys: TestKeys | None  # the test keys when Secure Boot is on
    cmdline: str


def build_uefi_boot(
    work: Path,
    *,
    initrd: Path,
    os_release: Path,
    cmdline: str,
    secure_boot: bool = True,
    kernel: Path | None = None,
    extra: Mapping[str, str] | None = None,
    default: str = SAVED,
) -> UefiBoot:
    """The UKI, the ESP image and the firmware in ``work`` (``cmdline`` gets console=ttyS0).

    ``extra`` (entry name -> more words) adds UKIs of the same kernel and initrd whose command
    line is ``cmdline`` plus those words (the factory-reset entry: under Secure Boot a UKI's
    command line cannot be changed, so each command line is a UKI of its own); loader.conf
    boots ``default``."""
    work.mkdir(parents=True, exist_ok=True)
    keys = test_keys() if secure_boot else None
    signing = keys.db if keys is not None else None
    full = f"console=ttyS0 {cmdline}".strip()
    kernel = kernel or ensure_kernel().vmlinuz

    def uki(name: str, words: str) -> Path:
        return build_uki(
            work / name,
            kernel=kernel,
            initrd=initrd,
            cmdline=words,
            os_release=os_release,
            signing=signing,
        )

    main = uki(ENTRY, full)
    more = {name: uki(name, f"{full} {words}") for name, words in (extra or {}).items()}
    esp = build_esp(work / "esp.img", main, signing=signing, extra=more, default=default)
    if keys is not None:
        firmware = harness.Uefi.secure_boot(enrolled_vars(work / "vars-enrolled.fd", keys))
    else:
        firmware = harness.Uefi()
    return UefiBoot(main, esp, firmware, keys, full)
