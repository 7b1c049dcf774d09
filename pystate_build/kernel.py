"""`build.py kernel`: Debian's current amd64 kernel, unpacked into the cache for QEMU and dracut.

`apt-get download linux-image-amd64` names the current `linux-image-<kver>` package in its
Depends; that package is downloaded and unpacked with `dpkg-deb -x` into
``cache/kernel/<kver>/``. ``cache/kernel/current`` remembers the choice, so a second call
downloads nothing (``--refresh`` asks the mirror again). dracut takes the result as
``--kver KVER --kmoddir MODULEDIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import CommandError, run

from . import CACHE

META_PACKAGE = "linux-image-amd64"
# apt-get download as root into a directory _apt cannot read warns; downloading as root is fine.
_APT = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download"]


class KernelError(PystateError):
    """The harness kernel could not be found, downloaded or unpacked."""


@dataclass(frozen=True)
class Kernel:
    version: str  # the kernel release (uname -r), e.g. 6.1.0-28-amd64
    vmlinuz: Path
    moduledir: Path  # <unpacked>/lib/modules/<version>, for dracut --kmoddir


def kernel_root() -> Path:
    return CACHE / "kernel"


def _cached(version: str) -> Kernel | None:
    base = kernel_root() / version
    kernel = Kernel(version, base / "boot" / f"vmlinuz-{version}", base / "lib/modules" / version)
    if kernel.vmlinuz.is_file() and (kernel.moduledir / "modules.dep").is_file():
        return kernel
    return None


def _image_package(meta_deb: Path) -> str:
    """The linux-image-<kver> package a linux-image-amd64 .deb depends on."""
    depends = run(["dpkg-deb", "-f", str(meta_deb), "Depends"]).stdout.decode()
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0]
        if re.fullmatch(r"linux-image-[0-9][^ ]*-amd64(-unsigned)?", name):
            return name
    raise KernelError(f"{meta_deb.name} depends on no linux-image-*-amd64 package: {depends!r}")


def _download(package: str, into: Path) -> Path:
    """apt-get download writes into the current directory: run it in ``into``."""
    try:
        with contextlib.chdir(into):
            run([*_APT, package])
    except CommandError as exc:
        raise KernelError(
            str(exc), hint="is the configured Debian mirror reachable? try apt-get update"
        ) from None
    debs = sorted(into.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise KernelError(f"apt-get download {package} left no .deb in {into}")
    return debs[-1]


def ensure_kernel(*, refresh: bool = False) -> Kernel:
    """The cached harness kernel; download and unpack the current one if needed (or refresh)."""
    root = kernel_root()
    current = root / "current"
    if not refresh and current.is_file():
        kernel = _cached(current.read_text().strip())
        if kernel is not None:
            return kernel
    root.mkdir(parents=True, exist_ok=True)
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    meta = _download(META_PACKAGE, debs)
    package = _image_package(meta)
    version = package.removeprefix("linux-image-").removesuffix("-unsigned")
    kernel = _cached(version)
    if kernel is None:
        deb = _download(package, debs)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{version}.") as tmp:
            run(["dpkg-deb", "-x", str(deb), tmp])
            moduledir = Path(tmp) / "lib/modules" / version
            if not (Path(tmp) / "boot" / f"vmlinuz-{version}").is_file():
                raise KernelError(f"{deb.name} holds no boot/vmlinuz-{version}")
            if not (moduledir / "modules.dep").is_file():
                run(["depmod", "-b", tmp, version])
            target = root / version
            if target.exists():
                shutil.rmtree(target)
            Path(tmp).rename(target)
            Path(tmp).mkdir()  # so TemporaryDirectory's cleanup finds what it made
        deb.unlink()
        kernel = _cached(version)
        if kernel is None:
            raise KernelError(f"unpacked kernel {version} in {root} is incomplete")
    meta.unlink(missing_ok=True)
    tmp_current = current.with_suffix(".tmp")
    tmp_current.write_text(version + "\n")
    tmp_current.rename(current)
    return kernel


def _cmd_kernel(args: argparse.Namespace) -> int:
    kernel = ensure_kernel(refresh=args.refresh)
    print(kernel.vmlinuz)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "kernel",
        help="download and unpack Debian's current amd64 kernel (cached); print its vmlinuz",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--refresh", action="store_true", help="ask the mirror for the current kernel again"
    )
    parser.set_defaults(func=_cmd_kernel)
