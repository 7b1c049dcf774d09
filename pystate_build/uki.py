"""``build.py uki``: a unified kernel image (UKI) from systemd-stub, as systemd 252 documents it.

systemd 252 (Debian 12) has no ukify. Its systemd-stub(7) page assembles a UKI with objcopy:
the stub (Debian ``systemd-boot-efi``) plus the sections ``.osrel`` (os-release), ``.cmdline``
(the kernel command line), ``.linux`` (the kernel) and ``.initrd``, each at a virtual address
past the previous one. The stub measures those sections into PCR 11 and, with Secure Boot on,
ignores a command line given by the boot loader: the embedded one is what boots.

``sign`` signs an EFI binary (the UKI, systemd-boot) with ``sbsign`` for Secure Boot.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import run

from . import OUT

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
SECTION_ALIGN = 0x10000
# Where systemd-stub(7) of systemd 252 puts the small sections; .linux and .initrd follow
# past the stub's own image at addresses computed from the sizes.
OSREL_VMA = 0x20000
CMDLINE_VMA = 0x30000
LINUX_VMA = 0x2000000


class UkiError(PystateError):
    """A unified kernel image could not be built or signed."""


@dataclass(frozen=True)
class SigningKey:
    """A private key and its X.509 certificate (PEM), as sbsign takes them."""

    key: Path
    cert: Path


def _align(n: int, to: int = SECTION_ALIGN) -> int:
    return -(-n // to) * to


def stub_image_end(stub: Path = STUB) -> int:
    """The stub's SizeOfImage: the first address past its own sections."""
    import pefile

    pe = pefile.PE(str(stub), fast_load=True)
    try:
        return int(pe.OPTIONAL_HEADER.SizeOfImage)
    finally:
        pe.close()


def section_layout(stub_end: int, sizes: dict[str, int]) -> dict[str, int]:
    """Virtual addresses for the added sections (pure): the documented ones where the stub
    leaves room, each later one aligned past the previous section's end."""
    if stub_end > OSREL_VMA:
        raise UkiError(f"the stub's image ends at {stub_end:#x}, past .osrel's {OSREL_VMA:#x}")
    if sizes[".osrel"] > CMDLINE_VMA - OSREL_VMA:
        raise UkiError(f"os-release of {sizes['.osrel']} bytes does not fit before .cmdline")
    vma = {".osrel": OSREL_VMA, ".cmdline": CMDLINE_VMA, ".linux": LINUX_VMA}
    cmdline_end = CMDLINE_VMA + sizes[".cmdline"]
    if cmdline_end > LINUX_VMA:
        raise UkiError("kernel command line too long")
    vma[".initrd"] = _align(LINUX_VMA + sizes[".linux"])
    return vma


def build_uki(
    out: Path,
    *,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    os_release: Path,
    signing: SigningKey | None = None,
    stub: Path = STUB,
) -> Path:
    """Write the UKI ``out`` (signed with ``signing`` when given); returns out."""
    for path in (stub, kernel, initrd, os_release):
        if not path.is_file():
            raise UkiError(f"{path}: no such file", hint="apt-get install systemd-boot-efi")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".uki.", dir=out.parent) as tmp:
        cmdline_file = Path(tmp) / "cmdline"
        cmdline_file.write_text(cmdline.strip() + "\n")
        files = {
            ".osrel": os_release,
            ".cmdline": cmdline_file,
            ".linux": kernel,
            ".initrd": initrd,
        }
        vma = section_layout(stub_image_end(stub), {s: p.stat().st_size for s, p in files.items()})
        unsigned = Path(tmp) / "unsigned.efi"
        argv = ["objcopy"]
        for section, path in files.items():
            argv += [
                "--add-section", f"{section}={path}",
                "--change-section-vma", f"{section}={vma[section]:#x}",
            ]  # fmt: skip
        run([*argv, str(stub), str(unsigned)])
        if signing is not None:
            sign(unsigned, out, signing)
        else:
            unsigned.replace(out)
    return out


def sign(src: Path, out: Path, signing: SigningKey) -> Path:
    """An Authenticode-signed copy of the EFI binary ``src`` (sbsign), checked by sbverify."""
    run(["sbsign", "--key", str(signing.key), "--cert", str(signing.cert),
         "--output", str(out), str(src)])  # fmt: skip
    run(["sbverify", "--cert", str(signing.cert), str(out)])
    return out


def _cmd(args: argparse.Namespace) -> int:
    from .kernel import ensure_kernel

    signing = None
    if args.sign_key or args.sign_cert:
        if not (args.sign_key and args.sign_cert):
            raise UkiError("--sign-key and --sign-cert go together")
        signing = SigningKey(Path(args.sign_key), Path(args.sign_cert))
    kernel = Path(args.kernel) if args.kernel else ensure_kernel().vmlinuz
    out = build_uki(
        Path(args.out),
        kernel=kernel,
        initrd=Path(args.initrd),
        cmdline=args.cmdline,
        os_release=Path(args.os_release),
        signing=signing,
    )
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB{', signed' if signing else ''})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "uki", help="a unified kernel image: systemd-stub + kernel + initrd + command line"
    )
    p.add_argument("out", help=f"the .efi to write (e.g. {OUT}/pystate.efi)")
    p.add_argument("--initrd", required=True, help="e.g. from build.py initrd")
    p.add_argument("--kernel", help="default: the harness kernel of build.py kernel")
    p.add_argument("--cmdline", default="console=ttyS0 ro", help="the embedded command line")
    p.add_argument("--os-release", default="/usr/lib/os-release", help="for .osrel")
    p.add_argument("--sign-key", help="PEM private key for sbsign (Secure Boot)")
    p.add_argument("--sign-cert", help="PEM certificate for sbsign")
    p.set_defaults(func=_cmd)
