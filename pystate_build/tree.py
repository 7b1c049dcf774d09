"""A minimal root tree that runs the frozen program: ``build_tree(dest) -> TreeReport``.

Contents, and nothing else of any Python installation:

- ``/usr/bin/python3.11`` and the ``python3`` symlink;
- the frozen program in ``/usr/lib/pystate/``: the launcher ``pystate`` (0755) and the
  package ``pystate.zip`` beside it, ``/usr/bin/pystate`` a relative symlink to the
  launcher (the layout of the Debian package and of the mkosi-initrd drop-in);
- its stdlib subset as ``/usr/lib/python311.zip``: the first entry of the interpreter's default
  ``sys.path``. getpath (3.11) finds ``prefix`` by searching up from the
  executable for ``lib/python311.zip`` and ``exec_prefix`` by searching for the
  directory ``lib/python3.11/lib-dynload``, so both exist and the interpreter starts
  without "Could not find platform independent libraries";
- ``/usr/lib/python3.11/lib-dynload/``: ``_cffi_backend`` (from Debian's
  python3-cffi-backend, found there even under ``-I -S``) and the stdlib extension
  modules the analysis found;
- the shared-library closure of all those ELF files (``elfclosure``), the ELF
  interpreter included, each copied with every symlink on its way: ``/lib64`` →
  ``usr/lib64``, ``ld-linux-x86-64.so.2`` → ``../lib/x86_64-linux-gnu/…``, SONAME
  links → real files. So the usrmerge links of the host are reproduced as found.

Host-only build code: never shipped in the initrd.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pystate_build import OUT
from pystate_build.elfclosure import library_closure
from pystate_build.freeze import (
    APP_ZIP,
    LAUNCHER,
    TARGET_PYTHON,
    FreezeReport,
    format_size,
    freeze,
)
from pystate_initrd.errors import PystateError

_MAX_LINKS = 40  # like ELOOP
PROGRAM_DIR = "/usr/lib/pystate"  # the launcher and pystate.zip; /usr/bin/pystate links here


class TreeError(PystateError):
    """The tree cannot be laid out."""


@dataclass(frozen=True)
class TreeReport:
    """What ``build_tree`` put into ``dest``: paths relative to it, sorted."""

    dest: Path
    files: tuple[str, ...]
    symlinks: tuple[str, ...]
    libraries: tuple[Path, ...]  # the closure, as found on the host
    freeze: FreezeReport

    @property
    def size(self) -> int:
        """Bytes of regular files in the tree."""
        return sum((self.dest / f).lstat().st_size for f in self.files)

    def describe(self) -> str:
        return (
            f"program {format_size(self.freeze.program_size)}, "
            f"stdlib {format_size(self.freeze.stdlib_size)}, "
            f"tree {format_size(self.size)} ({len(self.files)} files, "
            f"{len(self.symlinks)} symlinks, {len(self.libraries)} libraries)"
        )


def install_path(src: str | os.PathLike[str], root: Path, dest: str | None = None) -> list[str]:
    """Copy host file ``src`` to the same path under ``root``, recreating every symlink on
    the way (directory links such as ``/lib64`` as well as the file's own link chain).

    ``dest`` installs a regular file under another path instead. Returns the relative
    paths created or replaced. Existing links must agree; files are overwritten.
    """
    created: list[str] = []
    path = PurePosixPath(os.path.abspath(src))
    if dest is not None:
        if Path(path).is_symlink() or not Path(path).is_file():
            raise TreeError(f"{path} is not a regular file.")
        _copy_file(Path(path), root, PurePosixPath(dest).relative_to("/"), created)
        return created
    for _ in range(_MAX_LINKS):
        current = PurePosixPath("/")
        parts = path.parts[1:]
        for i, part in enumerate(parts):
            current = current / part
            host = Path(current)
            rel = current.relative_to("/")
            if host.is_symlink():
                link = os.readlink(host)
                _make_link(root, rel, link, created)
                resolved = PurePosixPath(os.path.normpath(current.parent / link))
                path = resolved.joinpath(*parts[i + 1 :])
                break
            if i == len(parts) - 1:
                if not host.is_file():
                    raise TreeError(f"{host} is not a regular file.")
                _copy_file(host, root, rel, created)
                return created
        else:
            raise TreeError(f"{src}: empty path.")
    raise TreeError(f"{src}: too many levels of symbolic links.")


def _make_link(root: Path, rel: PurePosixPath, link: str, created: list[str]) -> None:
    target = root / rel
    if target.is_symlink():
        if os.readlink(target) != link:
            raise TreeError(f"{target} links to {os.readlink(target)}, not {link}.")
        return
    if target.exists():
        raise TreeError(f"{target} exists and is not a symlink to {link}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(link, target)
    created.append(str(rel))


def _copy_file(host: Path, root: Path, rel: PurePosixPath, created: list[str]) -> None:
    target = root / rel
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise TreeError(f"{target} exists and is not a regular file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(host, tmp)
    os.chmod(tmp, host.stat().st_mode & 0o7777)
    os.replace(tmp, target)
    created.append(str(rel))


def build_tree(
    dest: Path,
    *,
    python: Path = TARGET_PYTHON,
    freeze_dir: Path | None = None,
    epoch: int | None = None,
    test_hooks: bool = False,
) -> TreeReport:
    """Freeze the program (into ``freeze_dir``, default out/freeze) and lay out ``dest``;
    ``test_hooks``: a test build (the crash tests' hooks, never shipped).

    ``dest`` may already hold other files (a dracut staging root, say): entries are
    added, files overwritten, conflicting symlinks refused.
    """
    default_dir = OUT / ("freeze-test-hooks" if test_hooks else "freeze")
    report = freeze(freeze_dir or default_dir, python=python, epoch=epoch, test_hooks=test_hooks)
    target = report.target
    major, minor = target.version[:2]
    dest.mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    created += install_path(python, dest)
    bindir = PurePosixPath(os.path.realpath(python)).parent
    short = f"python{major}"
    link = dest / bindir.relative_to("/") / short
    if not link.is_symlink():
        _make_link(dest, bindir.relative_to("/") / short, python.name, created)
    created += install_path(report.launcher, dest, f"{PROGRAM_DIR}/{LAUNCHER}")
    os.chmod(dest / PROGRAM_DIR.lstrip("/") / LAUNCHER, 0o755)
    created += install_path(report.app_zip, dest, f"{PROGRAM_DIR}/{APP_ZIP}")
    os.chmod(dest / PROGRAM_DIR.lstrip("/") / APP_ZIP, 0o644)
    _make_link(dest, PurePosixPath("usr/bin") / LAUNCHER, f"../lib/pystate/{LAUNCHER}", created)
    created += install_path(report.stdlib_zip, dest, f"/usr/lib/{target.stdlib_zip_name}")
    os.chmod(dest / "usr/lib" / target.stdlib_zip_name, 0o644)
    elves = [python]
    for name, so in sorted(report.extensions.items()):
        if not so.is_file():
            raise TreeError(
                f"extension module {name} not found at {so}",
                hint="install python3-cffi-backend" if name == "_cffi_backend" else None,
            )
        where = target.dynload / so.name
        created += install_path(so, dest, str(where))
        elves.append(so)
    libraries = library_closure(elves, use_known_dlopen=False)
    for lib in libraries:
        created += install_path(lib, dest)
    files: set[str] = set()
    links: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(dest))
            if full.is_symlink():
                links.add(rel)
            elif full.is_file():
                files.add(rel)
    return TreeReport(
        dest=dest,
        files=tuple(sorted(files)),
        symlinks=tuple(sorted(links)),
        libraries=tuple(libraries),
        freeze=report,
    )


def _cmd_tree(args: argparse.Namespace) -> int:
    report = build_tree(args.dir, python=args.python)
    print(report.describe())
    exts = ", ".join(sorted(report.freeze.extensions)) or "none"
    skipped = ", ".join(report.freeze.analysis.skipped) or "none"
    print(f"extension modules: {exts}; not shipped (optional, see freeze.py): {skipped}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "tree",
        help="lay out a minimal root that runs /usr/bin/pystate",
        description="Lay out DIR with the interpreter, its libraries, _cffi_backend, the frozen "
        "stdlib and the program (launcher + pystate.zip), so that "
        "`chroot DIR /usr/bin/pystate --version` works.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR")
    parser.add_argument(
        "--python", type=Path, default=TARGET_PYTHON, help="target interpreter (%(default)s)"
    )
    parser.set_defaults(func=_cmd_tree)
