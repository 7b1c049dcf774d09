"""``build.py deb OUT_DIR``: pystate as a Debian binary package, everything a distributor installs.

``build_deb(out_dir)`` writes ``out_dir/pystate_<version>_<arch>.deb`` with dpkg-deb:

- ``/usr/lib/pystate/``: the payload (the launcher script ``pystate``, the package
  ``pystate.zip``, the frozen stdlib ``python311.zip``, ``lib-dynload/*.so``), the same
  freeze ``build.py payload`` makes;
- ``/usr/bin/pystate``: a relative symlink to the launcher (which finds pystate.zip and the
  stdlib beside its real file, README step 6);
- ``/usr/lib/dracut/modules.d/90pystate/``: the dracut module (``dracut-module/`` without
  the booted system's unit and the repart.d definition);
- ``/usr/lib/repart.d/50-pystate-state.conf``: the state partition for systemd-repart, which
  reads it from the OS image (``--root=/sysroot`` in the initrd; docs/repart.md);
- ``/usr/lib/systemd/system/pystate-resized.service``: the resize service, enabled by the
  postinst through deb-systemd-helper as dh_installsystemd does;
- ``/usr/lib/mkosi-initrd/mkosi.conf.d/50-pystate/``: the mkosi-initrd drop-in, whatever
  ``mkosi-initrd/`` holds at build time (left out while that directory does not exist);
- ``/usr/share/man/man1/pystate.1.gz``: made from the program's ``--help`` texts;
- ``/usr/share/doc/pystate/``: copyright (DEP-5), changelog.gz, README.md and docs/*.md
  (the units' ``Documentation=`` point there).

The version is pyproject.toml's (checked against ``pystate_initrd.__version__``); the
architecture is dpkg's, since lib-dynload holds compiled modules. Depends: the shared
libraries of those modules (dpkg-shlibdeps) and the programs ``module-setup.sh`` requires
and the booted service runs (docs/packaging.md says which and why). Reproducible: every
mtime is ``SOURCE_DATE_EPOCH`` (freeze.default_epoch), owners root:root, dpkg-deb sorts.

``unpacked_package(dest)`` builds the package and ``dpkg -x``-es it: the tree the test
initrds take the dracut module and the payload from.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import os
import re
import shutil
import time
import tomllib
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import CommandError, run

from . import OUT, REPO
from .initrd import build_payload

NAME = "pystate"
LIB = Path("usr/lib/pystate")
DRACUT_MODULE = Path("usr/lib/dracut/modules.d/90pystate")
MKOSI_DROPIN = Path("usr/lib/mkosi-initrd/mkosi.conf.d/50-pystate")
UNITS = Path("usr/lib/systemd/system")
REPART_DIR = Path("usr/lib/repart.d")
REPART_DEFINITION = "50-pystate-state.conf"  # dracut-module/repart.d/, not in the module
DOC = Path("usr/share/doc/pystate")
RESIZED_UNIT = "pystate-resized.service"
# The booted system's unit ships in /usr/lib/systemd/system and the repart.d definition in
# /usr/lib/repart.d, not in the dracut module.
DRACUT_FILES = (
    "module-setup.sh",
    "pystate-hook.sh",
    "pystate.service",
    "systemd-repart-pystate.conf",
)

# python3.11: /usr/bin/python3.11, the payload's interpreter (zipapp shebang, the dracut
# module's inst_binary). The program needs only python3.11-minimal (its stdlib is frozen in
# python311.zip), but a dependency on a -minimal package is a lintian error (they exist to
# become Essential). e2fsprogs: e2fsck, mkfs.ext4 (check()), resize2fs (the service).
# cryptsetup-bin: cryptsetup (check(), the service). coreutils (cp) and init-system-helpers
# (the maintainer scripts) are Essential. The libraries come from dpkg-shlibdeps.
DEPENDS = ("python3.11", "e2fsprogs", "cryptsetup-bin")
# tpm2-tools bring tpm2-tss's ESAPI libraries, which the dracut module copies into the
# initrd when present (not the tools themselves) and the booted system uses; tpm2-tools are
# the fallback there. The TCTI is dlopen()ed: nothing else brings libtss2-tcti-device0.
# Without them no key is sealed and every boot asks for the recovery key. btrfs-progs:
# btrfs as the image's inner file system (mkfs.btrfs, `btrfs filesystem resize`).
RECOMMENDS = ("tpm2-tools", "libtss2-tcti-device0", "btrfs-progs")
# An initrd builder (the module and the drop-in do nothing without one); xfs_growfs for an
# xfs state partition.
SUGGESTS = ("dracut-core | mkosi", "xfsprogs")
SYNOPSIS = "state partition for image-based systems, set up in the initrd"
DESCRIPTION = """\
pystate gives an image-based system (a read-only or replaceable root) one
partition for everything that must persist. In the initrd it finds the GPT
state partition, unlocks a LUKS2 image file on it whose key is sealed to the
TPM2 (a recovery key otherwise), and bind-mounts its entries (/etc, /var,
/home, ...) onto the new root. In the booted system pystate-resized.service
grows and shrinks the image as free space requires.
.
The package holds the frozen program (run by python3.11, with its own
subset of the standard library), the dracut module "pystate", the
mkosi-initrd drop-in, the resize service and a systemd-repart definition
that adds the state partition to a disk without one."""

POSTINST = f"""\
#!/bin/sh
# {RESIZED_UNIT}: enabled on the first installation, as dh_installsystemd does
# (it does nothing unless the initrd opened an image: ConditionPathExists=).
set -e
case "$1" in
configure | abort-upgrade | abort-deconfigure | abort-remove)
	deb-systemd-helper unmask {RESIZED_UNIT} >/dev/null || true
	if deb-systemd-helper --quiet was-enabled {RESIZED_UNIT}; then
		deb-systemd-helper enable {RESIZED_UNIT} >/dev/null || true
	else
		deb-systemd-helper update-state {RESIZED_UNIT} >/dev/null || true
	fi
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		deb-systemd-invoke restart {RESIZED_UNIT} >/dev/null || true
	fi
	;;
esac
exit 0
"""
PRERM = f"""\
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop {RESIZED_UNIT} >/dev/null || true
fi
exit 0
"""
POSTRM = f"""\
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if command -v deb-systemd-helper >/dev/null; then
	case "$1" in
	remove)
		deb-systemd-helper mask {RESIZED_UNIT} >/dev/null || true
		;;
	purge)
		deb-systemd-helper purge {RESIZED_UNIT} >/dev/null || true
		deb-systemd-helper unmask {RESIZED_UNIT} >/dev/null || true
		;;
	esac
fi
exit 0
"""
MAINTAINER_SCRIPTS = {"postinst": POSTINST, "prerm": PRERM, "postrm": POSTRM}

COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pystate
Comment: Built from the pystate repository by `build.py deb`. lib-dynload/ holds
 extension modules of Debian's python3.11 (Python Software Foundation License)
 and python3-cffi-backend (MIT), copied unchanged; their copyright files are in
 /usr/share/doc/libpython3.11-stdlib and /usr/share/doc/python3-cffi-backend.
 python311.zip holds modules of the Python standard library compiled to
 bytecode, under the same license as Debian's python3.11.

Files: *
Copyright: {year} the pystate authors
License: no-license-granted
 The pystate repository carries no license yet. Until its authors choose one,
 no rights beyond those of copyright law are granted.
"""


class DebError(PystateError):
    """The Debian package could not be built or unpacked."""


def version() -> str:
    """The version: pyproject.toml's, which ``pystate_initrd.__version__`` must repeat."""
    from pystate_initrd import __version__

    with (REPO / "pyproject.toml").open("rb") as f:
        declared = str(tomllib.load(f)["project"]["version"])
    if declared != __version__:
        raise DebError(
            f"pyproject.toml says version {declared}, pystate_initrd/__init__.py says "
            f"{__version__}: make them agree."
        )
    return declared


def architecture() -> str:
    """dpkg's architecture of this machine (the payload's .so files are built for it)."""
    return _text(["dpkg", "--print-architecture"]).strip()


def maintainer() -> str:
    """``DEBFULLNAME <DEBEMAIL>`` when set, else the author of the checkout's last commit."""
    name, email = os.environ.get("DEBFULLNAME"), os.environ.get("DEBEMAIL")
    if name and email:
        return f"{name} <{email}>"
    try:
        return _text(["git", "-C", str(REPO), "log", "-1", "--format=%an <%ae>"]).strip()
    except CommandError:
        raise DebError("no maintainer: set DEBFULLNAME and DEBEMAIL.") from None


def _text(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The command's standard output as text (system/run.py's runner: CommandError names it)."""
    return run(argv, env=env).stdout.decode()


def _copy(src: Path, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _mode(path: Path) -> int:
    """0755 for executables and scripts with a shebang, 0644 otherwise."""
    with path.open("rb") as f:
        executable = os.access(path, os.X_OK) or f.read(2) == b"#!"
    return 0o755 if executable else 0o644


def _relative_link(link: Path, target: str, root: Path) -> str:
    """An absolute link target inside /usr made relative, as dh_link does (Policy 10.5)."""
    if not target.startswith("/usr/"):
        return target
    return os.path.relpath(target, "/" + str(link.parent.relative_to(root)))


def _copy_tree(src: Path, dest: Path, dest_root: Path) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts:
            continue
        target = dest / rel
        if path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(_relative_link(dest / rel, os.readlink(path), dest_root))
        elif path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            _copy(path, target, _mode(path))


def stage(tree: Path, payload: Path, epoch: int) -> None:
    """Lay out the package's files in ``tree`` (which must not exist)."""
    shutil.copytree(payload, tree / LIB)
    for path in (tree / LIB).rglob("*"):
        if path.is_file():
            path.chmod(0o755 if path.name == "pystate" and path.parent == tree / LIB else 0o644)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/pystate").symlink_to("../lib/pystate/pystate")
    module = REPO / "dracut-module"
    for name in DRACUT_FILES:
        _copy(module / name, tree / DRACUT_MODULE / name, _mode(module / name))
    _copy(module / RESIZED_UNIT, tree / UNITS / RESIZED_UNIT, 0o644)
    _copy(module / "repart.d" / REPART_DEFINITION, tree / REPART_DIR / REPART_DEFINITION, 0o644)
    if (REPO / "mkosi-initrd").is_dir():
        _copy_tree(REPO / "mkosi-initrd", tree / MKOSI_DROPIN, tree)
    year = time.gmtime(epoch).tm_year
    doc = tree / DOC
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT.format(year=year))
    (doc / "changelog.gz").write_bytes(gzip.compress(_changelog(epoch).encode(), 9, mtime=0))
    man = tree / "usr/share/man/man1/pystate.1.gz"
    man.parent.mkdir(parents=True)
    page = manual_page(tree / LIB / "pystate", epoch)
    man.write_bytes(gzip.compress(page.encode(), 9, mtime=0))
    _copy(REPO / "README.md", doc / "README.md", 0o644)
    for md in sorted((REPO / "docs").glob("*.md")):
        _copy(md, doc / md.name, 0o644)


def _roff(text: str) -> str:
    """Text for a no-fill block of a man page: backslashes and leading dots escaped."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        lines.append(f"\\&{line}" if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def manual_page(program: Path, epoch: int) -> str:
    """pystate(1) from the program's own --help and each command's (it has no other)."""
    # argparse wraps at $COLUMNS: fixed, so the page is the same on every terminal
    env = {"COLUMNS": "80", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
    main = _text([str(program), "--help"], env=env)
    commands = re.findall(r"^ {4}([a-z][a-z0-9-]*) ", main, re.MULTILINE)
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    parts = [
        f'.TH PYSTATE 1 "{date}" "pystate {version()}" "pystate"',
        ".SH NAME",
        f"pystate \\- {SYNOPSIS}",
        ".SH SYNOPSIS",
        ".nf",
        _roff(main),
        ".fi",
        ".SH COMMANDS",
    ]
    for command in commands:
        parts += [
            f".SS {command}",
            ".nf",
            _roff(_text([str(program), command, "--help"], env=env)),
        ]
        parts.append(".fi")
    parts += [
        ".SH SEE ALSO",
        "README.md and the documents beside it in /usr/share/doc/pystate/;",
        ".BR dracut (8).",
    ]
    return "\n".join(parts) + "\n"


def _changelog(epoch: int) -> str:
    return (
        f"{NAME} ({version()}) unstable; urgency=medium\n\n"
        "  * Built from the pystate repository by build.py deb.\n\n"
        f" -- {maintainer()}  {formatdate(epoch, usegmt=True).replace('GMT', '+0000')}\n"
    )


def _files(tree: Path) -> Iterator[Path]:
    yield from sorted(tree.rglob("*"))


def installed_size(tree: Path) -> int:
    """KiB as dpkg-gencontrol counts them: each file rounded up, 1 per directory or link."""
    total = 0
    for path in _files(tree):
        if path.is_file() and not path.is_symlink():
            total += (path.stat().st_size + 1023) // 1024
        else:
            total += 1
    return total


def shlib_depends(work: Path, tree: Path) -> list[str]:
    """dpkg-shlibdeps's dependencies of the ELF files in the tree (the .so modules)."""
    elves = [p for p in _files(tree) if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]
    if not elves:
        return []
    with contextlib.chdir(work):  # dpkg-shlibdeps reads debian/control from there
        out = _text(["dpkg-shlibdeps", "-O", *(str(p.relative_to(work)) for p in elves)])
    for line in out.splitlines():
        if line.startswith("shlibs:Depends="):
            return [d.strip() for d in line.split("=", 1)[1].split(",") if d.strip()]
    return []


def control(tree: Path, depends: list[str], arch: str) -> str:
    lines = [
        f"Package: {NAME}",
        f"Version: {version()}",
        f"Architecture: {arch}",
        f"Maintainer: {maintainer()}",
        f"Installed-Size: {installed_size(tree)}",
        f"Depends: {', '.join(depends)}",
        f"Recommends: {', '.join(RECOMMENDS)}",
        f"Suggests: {', '.join(SUGGESTS)}",
        "Section: admin",
        "Priority: optional",
        f"Description: {SYNOPSIS}",
        *(f" {line}" for line in DESCRIPTION.splitlines()),
    ]
    return "\n".join(lines) + "\n"


def _md5sums(tree: Path) -> str:
    rows = []
    for path in _files(tree):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            rows.append(f"{digest}  {path.relative_to(tree)}\n")
    return "".join(rows)


def _set_times(top: Path, epoch: int) -> None:
    for path in [top, *_files(top)]:
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def build_deb(out_dir: Path, *, payload: Path | None = None, epoch: int | None = None) -> Path:
    """Build ``out_dir/pystate_<version>_<arch>.deb``; ``payload``: an already built payload
    directory (``build.py payload``), else one is frozen from this checkout."""
    from .freeze import APP_ZIP, LAUNCHER, default_epoch, has_test_hooks

    epoch = default_epoch() if epoch is None else epoch
    arch = architecture()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f"{NAME}-deb-work"
    if work.exists():
        shutil.rmtree(work)
    tree = work / "debian" / NAME
    if payload is None:
        payload = build_payload(work / "payload", freeze_dir=work / "freeze", epoch=epoch)
    elif not ((payload / LAUNCHER).is_file() and (payload / APP_ZIP).is_file()):
        raise DebError(f"{payload} is not a payload directory (no {LAUNCHER} and {APP_ZIP} in it).")
    elif has_test_hooks(payload / APP_ZIP):
        raise DebError(
            f"{payload} is a test build (build.py payload --test-hooks): never packaged.",
            hint="build the payload without --test-hooks",
        )
    stage(tree, payload, epoch)
    (work / "debian/control").write_text(f"Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n")
    depends = [*shlib_depends(work, tree), *DEPENDS]
    meta = tree / "DEBIAN"
    meta.mkdir()
    (meta / "md5sums").write_text(_md5sums(tree))
    (meta / "control").write_text(control(tree, depends, arch))
    for name, text in MAINTAINER_SCRIPTS.items():
        (meta / name).write_text(text)
        (meta / name).chmod(0o755)
    for path in (meta / "md5sums", meta / "control"):
        path.chmod(0o644)
    _set_times(tree, epoch)
    deb = out_dir / f"{NAME}_{version()}_{arch}.deb"
    # SOURCE_DATE_EPOCH: dpkg-deb's time stamps of the ar members (the tar ones are the files')
    env = {"SOURCE_DATE_EPOCH": str(epoch)}
    _text(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(tree), str(deb)], env=env)
    shutil.rmtree(work)
    return deb


def unpacked_package(dest: Path, *, payload: Path | None = None) -> Path:
    """Build the package and ``dpkg -x`` it into ``dest`` (replaced); returns dest.

    ``dest/usr/lib/dracut/modules.d/90pystate`` is the dracut module and
    ``dest/usr/lib/pystate`` its payload (``PYSTATE_PAYLOAD``), exactly as installed."""
    if dest.exists():
        shutil.rmtree(dest)
    deb = build_deb(dest.with_name(dest.name + ".deb.d"), payload=payload)
    _text(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def _cmd_deb(args: argparse.Namespace) -> int:
    deb = build_deb(Path(args.out_dir), payload=Path(args.payload) if args.payload else None)
    print(f"{deb} ({deb.stat().st_size / 1024:.1f} KiB)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "deb",
        help="the Debian package: payload, dracut module, mkosi-initrd drop-in, resize unit",
        description="Build OUT_DIR/pystate_<version>_<arch>.deb with dpkg-deb "
        "(reproducible with SOURCE_DATE_EPOCH).",
    )
    p.add_argument("out_dir", nargs="?", default=str(OUT / "deb"), metavar="OUT_DIR")
    p.add_argument("--payload", help="an already built payload directory (build.py payload)")
    p.set_defaults(func=_cmd_deb)
