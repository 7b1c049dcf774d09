"""``build.py payload`` and ``build.py initrd``: the dracut module's input and a test initrd.

(``build.py initrd --builder mkosi`` hands over to mkosi.py.)

The payload is what a distribution package installs in /usr/lib/pystate for
the dracut module: the launcher script (``pystate``), the package
(``pystate.zip``), the frozen stdlib (``python311.zip``) and the extension
modules it needs (``lib-dynload/``).
It is the same freeze that ``build.py tree`` lays out and the chroot test
runs, so the initrd runs exactly what was tested.

The initrd is made by the system's dracut with the module taken from this
checkout: dracut is pointed at a private module directory (symlinks to the
system's modules plus ours), so nothing is installed on the build machine.

``--test-hooks`` (both commands; ``test_hooks=True``) makes a test build: the payload's
program holds the crash tests' hooks (``pystate_initrd/testhooks/``: power cuts, PCR
extends; SPEC §11.10). A test initrd is then the package's dracut module (or mkosi drop-in)
with a test-hooks payload in place of the package's. Without the flag, and always in the
Debian package, the program has none of that code.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import run

from . import OUT, REPO
from .freeze import add_test_hooks_option
from .kernel import Kernel, ensure_kernel

SYSTEM_DRACUT = Path("/usr/lib/dracut")
MODULE_NAME = "90pystate"

# The fewest dracut modules that boot a GPT root partition; dependencies are added by dracut.
# systemd-repart: makes the state partition on a factory-fresh disk (docs/repart.md); it does
# nothing where the OS image has no /usr/lib/repart.d.
SYSTEMD_MODULES = (
    "systemd-initrd", "dracut-systemd", "rootfs-block", "udev-rules", "fs-lib", "systemd-repart",
)  # fmt: skip
SHELL_MODULES = ("rootfs-block", "udev-rules", "fs-lib", "kernel-modules")
DRIVERS = (
    "virtio_blk", "virtio_pci", "virtio_console", "erofs", "squashfs", "ext4", "btrfs", "xfs",
    "loop",
)  # fmt: skip


class InitrdError(PystateError):
    """The payload or the initrd could not be built."""


def build_payload(
    dest: Path,
    *,
    freeze_dir: Path | None = None,
    epoch: int | None = None,
    test_hooks: bool = False,
) -> Path:
    """Lay out the payload in dest (replaced if present): the launcher ``pystate``, the
    package ``pystate.zip``, the frozen stdlib and the extension modules. ``freeze_dir``
    keeps the freeze's work apart from other builds running in the same checkout;
    ``epoch`` is SOURCE_DATE_EPOCH for the freeze;
    ``test_hooks``: a test build (the crash tests' hooks; never shipped)."""
    from .freeze import APP_ZIP, LAUNCHER, freeze

    default_dir = OUT / ("freeze-test-hooks" if test_hooks else "freeze")
    report = freeze(freeze_dir or default_dir, epoch=epoch, test_hooks=test_hooks)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "lib-dynload").mkdir(parents=True)
    # copyfile, not copy2: modes and times are the package's, not the build machine's.
    shutil.copyfile(report.launcher, dest / LAUNCHER)
    (dest / LAUNCHER).chmod(0o755)
    shutil.copyfile(report.app_zip, dest / APP_ZIP)
    shutil.copyfile(report.stdlib_zip, dest / "python311.zip")
    for so in sorted(report.extensions.values()):
        shutil.copyfile(so, dest / "lib-dynload" / so.name)
    return dest


def dracut_basedir(dest: Path, pystate_module: Path = REPO / "dracut-module") -> Path:
    """A dracut base directory: the system's files plus pystate's module (``pystate_module``)."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "modules.d").mkdir(parents=True)
    for entry in SYSTEM_DRACUT.iterdir():
        if entry.name != "modules.d":
            (dest / entry.name).symlink_to(entry)
    for module in (SYSTEM_DRACUT / "modules.d").iterdir():
        (dest / "modules.d" / module.name).symlink_to(module)
    (dest / "modules.d" / MODULE_NAME).symlink_to(pystate_module)
    return dest


def build_initrd(
    out: Path,
    *,
    systemd: bool = True,
    with_pystate: bool = True,
    conf: Path | None = None,
    kernel: Kernel | None = None,
    extra_modules: tuple[str, ...] = (),
    compress: bool = True,
    test_hooks: bool = False,
    include: Path | None = None,
    install: tuple[str, ...] = (),
) -> Path:
    """Build a dracut initrd for the harness kernel; returns out.

    ``compress=False`` leaves it uncompressed: larger, but the kernel unpacks it faster
    under TCG (the plain harness initrd of initrd_plain.py). ``test_hooks``: the package's
    module with a test-hooks payload (the crash tests). ``include``: a directory whose tree
    is copied over the initrd's root (dracut --include; the benchmarks' units);
    ``install``: more programs by name (dracut --install)."""
    kernel = kernel or ensure_kernel()
    work = OUT / "initrd-work"
    work.mkdir(parents=True, exist_ok=True)
    modules = list(SYSTEMD_MODULES if systemd else SHELL_MODULES) + list(extra_modules)
    env = {}
    module = REPO / "dracut-module"
    if test_hooks and not with_pystate:
        raise InitrdError("test hooks are part of pystate: not without it")
    if with_pystate:
        # What a distributor installs: the Debian package's dracut module and payload.
        from .deb import unpacked_package

        package = unpacked_package(work / "package")
        module = package / "usr/lib/dracut/modules.d" / MODULE_NAME
        env["PYSTATE_PAYLOAD"] = str(package / "usr/lib/pystate")
        if test_hooks:
            payload = work / "test-hooks-payload"
            build_payload(payload, freeze_dir=work / "freeze-test-hooks", test_hooks=True)
            env["PYSTATE_PAYLOAD"] = str(payload)
        modules.append("pystate")
        if conf is not None:
            env["PYSTATE_CONF"] = str(conf.resolve())
    env["dracutbasedir"] = str(dracut_basedir(work / "dracut-base", module))
    argv = [
        "dracut", "--force", "--quiet", "--no-hostonly", "--no-hostonly-cmdline",
        "--no-early-microcode", "--reproducible",
        *(["--compress", "zstd"] if compress else ["--no-compress"]),
        "--conf", "/dev/null", "--confdir", str(work / "no-conf.d"),
        "--kver", kernel.version, "--kmoddir", str(kernel.moduledir),
        "--modules", " ".join(modules), "--drivers", " ".join(DRIVERS),
    ]  # fmt: skip
    if not systemd:
        argv += ["--omit", "systemd systemd-initrd dracut-systemd"]
    if include is not None:
        argv += ["--include", str(include), "/"]
    if install:
        argv += ["--install", " ".join(install)]
    argv.append(str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    (work / "no-conf.d").mkdir(exist_ok=True)
    run(argv, env={**env, "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
    return out


def _cmd_payload(args: argparse.Namespace) -> int:
    dest = build_payload(Path(args.dir), test_hooks=args.test_hooks)
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>10}  {path}")
    return 0


def _cmd_initrd(args: argparse.Namespace) -> int:
    conf = Path(args.conf) if args.conf else None
    if args.builder == "mkosi":
        if args.no_systemd or args.no_pystate:
            raise InitrdError("--builder mkosi makes a systemd initrd with pystate only")
        from .mkosi import build_mkosi_initrd

        out = build_mkosi_initrd(Path(args.out), conf=conf, test_hooks=args.test_hooks)
    else:
        out = build_initrd(
            Path(args.out),
            systemd=not args.no_systemd,
            with_pystate=not args.no_pystate,
            conf=conf,
            test_hooks=args.test_hooks,
        )
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "payload", help="the dracut module's payload (launcher, pystate.zip, stdlib, .so)"
    )
    p.add_argument("dir", help="destination, e.g. /usr/lib/pystate")
    add_test_hooks_option(p)
    p.set_defaults(func=_cmd_payload)
    p = subparsers.add_parser("initrd", help="a test initrd with pystate (dracut or mkosi)")
    p.add_argument("out", help="the initrd file to write")
    p.add_argument(
        "--builder",
        choices=("dracut", "mkosi"),
        default="dracut",
        help="dracut with dracut-module/ (default), or mkosi-initrd with mkosi-initrd/",
    )
    p.add_argument("--no-systemd", action="store_true", help="dracut's shell init, no systemd")
    p.add_argument("--no-pystate", action="store_true", help="leave the pystate module out")
    p.add_argument("--conf", help="pystate.conf to put in the initrd's /etc/pystate/")
    add_test_hooks_option(p)
    p.set_defaults(func=_cmd_initrd)
