"""An EFI system partition image: systemd-boot and its UKIs, made with mtools (no mount).

The layout is what ``bootctl install`` leaves, minus the random seed:

    /EFI/BOOT/BOOTX64.EFI              systemd-boot (the removable-media path the firmware
    /EFI/systemd/systemd-bootx64.efi   boots with no Boot#### variable), and its own copy
    /EFI/Linux/<name>.efi              the UKI: a Type #2 entry systemd-boot finds by itself
    /EFI/Linux/<other>.efi             more UKIs (``extra``), e.g. the factory-reset entry
    /loader/loader.conf                timeout 0: boot the default entry at once

With ``signing`` both EFI binaries are signed (uki.sign) for Secure Boot. systemd-boot sets
``LoaderDevicePartUUID`` to this partition's PARTUUID, which systemd-gpt-auto-generator (the
root) and pystate (the state partition, SPEC §2 rule 2) follow to the boot disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import run

from .uki import SYSTEMD_BOOT, SigningKey, sign

MiB = 1 << 20
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
ESP_NAME = "esp"
SAVED = "@saved"  # systemd-boot's default: the entry booted last


def loader_conf(default: str = SAVED) -> str:
    """loader.conf: no menu, ``default`` (an entry id, a glob, or @saved) (pure)."""
    return f"timeout 0\ndefault {default}\nconsole-mode keep\neditor no\n"


SYSTEMD_BOOT_BYTES = 256 * 1024  # systemd-bootx64.efi is ~140 KiB; signed a little more
HEADROOM = 16 * MiB  # room for a second UKI of an update, and FAT's own tables


class EspError(PystateError):
    """The EFI system partition could not be built."""


def esp_size(uki_bytes: int) -> int:
    """The partition size for UKIs of ``uki_bytes`` in all: them, systemd-boot and headroom,
    in whole MiB, at least 64 MiB (pure)."""
    need = uki_bytes + SYSTEMD_BOOT_BYTES + HEADROOM
    return max(64 * MiB, -(-need // MiB) * MiB)


def build_esp(
    out: Path,
    uki: Path,
    *,
    signing: SigningKey | None = None,
    entry_name: str = "pystate.efi",
    extra: Mapping[str, Path] | None = None,
    default: str = SAVED,
    systemd_boot: Path = SYSTEMD_BOOT,
) -> Path:
    """A FAT image ``out`` holding systemd-boot, ``uki`` as ``entry_name`` and each of
    ``extra`` (entry name -> UKI), all already signed when they must be; loader.conf boots
    ``default``."""
    entries = {entry_name: uki, **(extra or {})}
    for path in (*entries.values(), systemd_boot):
        if not path.is_file():
            raise EspError(f"{path}: no such file", hint="apt-get install systemd-boot")
    for name in entries:
        if "/" in name or not name.endswith(".efi"):
            raise EspError(f"UKI name {name!r} must be a file name ending in .efi")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    size = esp_size(sum(path.stat().st_size for path in entries.values()))
    with tempfile.TemporaryDirectory(prefix=".esp.", dir=out.parent) as tmp:
        boot = Path(tmp) / "systemd-bootx64.efi"
        if signing is not None:
            sign(systemd_boot, boot, signing)
        else:
            boot.write_bytes(systemd_boot.read_bytes())
        conf = Path(tmp) / "loader.conf"
        conf.write_text(loader_conf(default))
        run(["mkfs.vfat", "-C", "-n", "ESP", str(out), str(size // 1024)])
        mtools = ["-i", str(out)]
        run(["mmd", *mtools, "::/EFI", "::/EFI/BOOT", "::/EFI/systemd", "::/EFI/Linux",
             "::/loader"])  # fmt: skip
        for src, dest in (
            (boot, "::/EFI/BOOT/BOOTX64.EFI"),
            (boot, "::/EFI/systemd/systemd-bootx64.efi"),
            *((path, f"::/EFI/Linux/{name}") for name, path in entries.items()),
            (conf, "::/loader/loader.conf"),
        ):
            run(["mcopy", "-o", *mtools, str(src), dest])
    return out
