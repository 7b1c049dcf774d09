"""`build.py initrd-plain`: a plain dracut initrd (no pystate) that boots a GPT root partition.

The QEMU harness's own tests boot with it, so that a failure there points at the harness, the
kernel or the disk image, never at pystate. dracut's shell init (no systemd) with the fewest
modules that mount ``root=PARTUUID=…`` read-only (``initrd.build_initrd`` without the pystate
module, uncompressed); cached in ``out/`` per kernel version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import OUT
from .initrd import build_initrd
from .kernel import Kernel, ensure_kernel


def plain_initrd_path(kernel: Kernel) -> Path:
    return OUT / f"initrd-plain-{kernel.version}.img"


def build_plain_initrd(
    out: Path | None = None, *, kernel: Kernel | None = None, force: bool = False
) -> Path:
    """The plain initrd for the harness kernel; built once, then reused unless ``force``."""
    kernel = kernel or ensure_kernel()
    out = out or plain_initrd_path(kernel)
    if out.is_file() and not force:
        return out
    # Built beside and renamed into place: an interrupted build never leaves a cached half.
    tmp = out.with_name(f".{out.name}.tmp")
    build_initrd(tmp, systemd=False, with_pystate=False, compress=False, kernel=kernel)
    tmp.rename(out)
    return out


def _cmd(args: argparse.Namespace) -> int:
    out = build_plain_initrd(Path(args.out) if args.out else None, force=args.force)
    print(out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "initrd-plain",
        help="a plain dracut initrd (no pystate) for the harness tests (cached)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("out", nargs="?", help=f"default: {OUT}/initrd-plain-KVER.img")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.set_defaults(func=_cmd)
