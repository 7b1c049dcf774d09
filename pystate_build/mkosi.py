"""`build.py mkosi`, `build.py initrd --builder mkosi`: mkosi 24.3 and an initrd made with it.

Debian 12's own mkosi (14) makes no usable initrd, and installing bookworm-backports' 24.3
with apt would upgrade the machine's systemd to 254. So the .deb (pure Python) is fetched with
``apt-get download`` through a private apt configuration whose only source is
bookworm-backports on the mirrors this machine's apt sources already name, unpacked with
``dpkg -x`` into ``cache/mkosi/<version>/`` and run as ``python3 -m mkosi`` with PYTHONPATH
pointing there. Nothing on the machine is installed or changed (bubblewrap comes from
.ci/setup).

The initrd is what mkosi-initrd makes (``--include=mkosi-initrd``, cpio, zstd) plus this
checkout's drop-in ``mkosi-initrd/`` laid out as ``mkosi.conf.d/50-pystate/``, its two
symlinks pointed at the freshly built payload and at ``dracut-module/pystate.service``.
The entry point ``mkosi-initrd`` itself is not used: it always adds the host's loaded
modules (``/proc/modules``), which a CI machine may not have; this module passes the harness
kernel's tree instead, with its vmlinuz so that mkosi filters the modules.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import CommandError, run

from . import CACHE, OUT, REPO
from .kernel import Kernel, ensure_kernel
from .roots import deb822_fields

VERSION = "24.3-1~bpo12+1"
SUITE = "bookworm-backports"
PYTHON = "/usr/bin/python3"  # Debian's, as the mkosi package would use
APT_SOURCES = Path("/etc/apt")
DROP_IN = REPO / "mkosi-initrd"
DROP_IN_NAME = "50-pystate"
# The harness disk is virtio: mkosi-initrd's module list has virtio_pci but no virtio_blk.
HARNESS_MODULES = (r"/virtio_blk\.ko",)


class MkosiError(PystateError):
    """mkosi could not be fetched, or the initrd could not be built."""


# --- getting mkosi ----------------------------------------------------------------------


def mkosi_root() -> Path:
    return CACHE / "mkosi"


def mkosi_path(version: str = VERSION) -> Path:
    """The directory to put on PYTHONPATH (it holds the ``mkosi`` package)."""
    return mkosi_root() / version / "usr/lib/python3/dist-packages"


def backports_sources(etc_apt: Path = APT_SOURCES) -> str:
    """A deb822 sources file for SUITE on each mirror the machine's own bookworm sources use.

    Deriving it keeps the repository free of mirror names, and works where only a local
    mirror or a proxy is reachable."""
    stanzas: list[str] = []
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = deb822_fields(stanza)
            if (
                "bookworm" in fields.get("suites", "").split()
                and fields.get("enabled", "yes") != "no"
            ):
                stanzas.append(_stanza(fields["uris"], fields.get("components", "main"),
                                       fields.get("signed-by")))  # fmt: skip
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            m = re.fullmatch(r"\s*deb\s+(\[[^]]*\]\s+)?(\S+)\s+bookworm\s+(.+?)\s*", line)
            if m:
                opts = m.group(1) or ""
                signed = re.search(r"signed-by=(\S+?)[\s\]]", opts)
                stanzas.append(_stanza(m.group(2), m.group(3), signed.group(1) if signed else None))
    if not stanzas:
        raise MkosiError(
            f"no bookworm source in {etc_apt}/sources.list(.d): cannot derive {SUITE} from it"
        )
    return "\n".join(dict.fromkeys(stanzas))


def _stanza(uris: str, components: str, signed_by: str | None) -> str:
    lines = ["Types: deb", f"URIs: {uris}", f"Suites: {SUITE}", f"Components: {components}"]
    if signed_by:
        lines.append(f"Signed-By: {signed_by}")
    return "\n".join(lines) + "\n"


def ensure_mkosi(version: str = VERSION) -> Path:
    """mkosi ``version`` unpacked in the cache (downloaded once); returns its PYTHONPATH."""
    path = mkosi_path(version)
    if (path / "mkosi" / "__main__.py").is_file():
        return path
    apt = mkosi_root() / "apt"
    for sub in ("sources.list.d", "lists/partial", "archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list.d" / "backports.sources").write_text(backports_sources())
    # A private apt: its own source list, package lists and archive directory, so the
    # machine's apt state is neither read for this nor changed by it.
    options = [
        "-o", f"Dir::Etc::SourceList={os.devnull}",
        "-o", f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache::Archives={apt / 'archives'}",
        "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip
    try:
        run(["apt-get", "-q", *options, "update"])
        with contextlib.chdir(apt):
            run(["apt-get", "-q", *options, "download", f"mkosi={version}"])
    except CommandError as exc:
        raise MkosiError(str(exc), hint=f"is {SUITE} reachable on the configured mirror?") from None
    debs = sorted(apt.glob("mkosi_*.deb"))
    if not debs:
        raise MkosiError(f"apt-get download mkosi={version} left no .deb in {apt}")
    with tempfile.TemporaryDirectory(dir=mkosi_root(), prefix=f".{version}.") as tmp:
        run(["dpkg", "-x", str(debs[-1]), tmp])
        if not (Path(tmp) / path.relative_to(mkosi_root() / version) / "mkosi").is_dir():
            raise MkosiError(f"{debs[-1].name} holds no mkosi Python package")
        target = mkosi_root() / version
        if target.exists():
            shutil.rmtree(target)
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # so TemporaryDirectory's cleanup finds what it made
    for deb in debs:
        deb.unlink()
    return path


# --- the initrd -------------------------------------------------------------------------


def stage_drop_in(
    dest: Path,
    payload: Path,
    *,
    conf: Path | None = None,
    drop_in_source: Path = DROP_IN,
    unit: Path = REPO / "dracut-module" / "pystate.service",
) -> Path:
    """An include directory as mkosi-initrd reads /usr/lib/mkosi-initrd: the drop-in
    (``drop_in_source``: the checkout's, or the package's) as ``mkosi.conf.d/50-pystate/``,
    its links to installed files pointed at the payload and at the dracut module's unit;
    ``conf`` as /etc/pystate/pystate.conf through a second drop-in (as a distributor's
    /etc/mkosi-initrd/ would add it)."""
    if dest.exists():
        shutil.rmtree(dest)
    drop_in = dest / "mkosi.conf.d" / DROP_IN_NAME
    shutil.copytree(drop_in_source, drop_in, symlinks=True)
    links = {
        "payload": payload.resolve(),
        "pystate.service": unit.resolve(),
        "systemd-repart-pystate.conf": (unit.parent / "systemd-repart-pystate.conf").resolve(),
    }
    for name, target in links.items():
        (drop_in / name).unlink()
        (drop_in / name).symlink_to(target)
    if conf is not None:
        etc = dest / "mkosi.conf.d" / "60-pystate-conf" / "mkosi.extra/etc/pystate"
        etc.mkdir(parents=True)
        shutil.copy2(conf, etc / "pystate.conf")
    return dest


def package_manager_tree(dest: Path, etc_apt: Path = APT_SOURCES) -> Path:
    """The machine's apt sources for mkosi (as mkosi-initrd does): mkosi's own default
    repositories add a debug archive that a mirror may refuse, so an empty mkosi.sources
    replaces them and the machine's files are used as they are."""
    if dest.exists():
        shutil.rmtree(dest)
    parts = dest / "etc/apt/sources.list.d"
    parts.mkdir(parents=True)
    (parts / "mkosi.sources").touch()
    if (etc_apt / "sources.list").is_file():
        shutil.copy2(etc_apt / "sources.list", dest / "etc/apt/sources.list")
    for path in sorted((etc_apt / "sources.list.d").iterdir()):
        if path.suffix in (".list", ".sources") and path.is_file():
            shutil.copy2(path, parts / path.name)
    return dest


def build_mkosi_initrd(
    out: Path,
    *,
    kernel: Kernel | None = None,
    conf: Path | None = None,
    work: Path | None = None,
    log: Path | None = None,
    test_hooks: bool = False,
) -> Path:
    """The harness initrd made by mkosi-initrd with the pystate drop-in; returns out.

    ``test_hooks``: the package's drop-in with a test-hooks payload (the crash tests)."""
    from .deb import unpacked_package
    from .initrd import build_payload

    kernel = kernel or ensure_kernel()
    mkosi = ensure_mkosi()
    if shutil.which("bwrap") is None:
        raise MkosiError("mkosi needs bwrap: apt-get install bubblewrap (bash .ci/setup does)")
    work = work or OUT / "mkosi-work"
    work.mkdir(parents=True, exist_ok=True)
    # What a distributor installs: the Debian package's drop-in, payload and unit.
    package = unpacked_package(work / "package")
    payload = package / "usr/lib/pystate"
    if test_hooks:
        payload = build_payload(
            work / "test-hooks-payload", freeze_dir=work / "freeze-test-hooks", test_hooks=True
        )
    include = stage_drop_in(
        work / "include",
        payload,
        conf=conf,
        drop_in_source=package / "usr/lib/mkosi-initrd/mkosi.conf.d" / DROP_IN_NAME,
        unit=package / "usr/lib/dracut/modules.d/90pystate/pystate.service",
    )
    tree = package_manager_tree(work / "pkgmngr")
    output = work / "output"
    for d in (output, work / "workspace"):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    packages = mkosi_root() / "packages"  # downloaded .debs, kept across builds
    packages.mkdir(parents=True, exist_ok=True)
    modules = f"/usr/lib/modules/{kernel.version}"
    argv = [
        PYTHON, "-m", "mkosi", "--force", "--directory", "",
        "--distribution", "debian", "--release", "bookworm", "--architecture", "x86-64",
        "--format", "cpio", "--compress-output", "zstd", "--output", "initrd",
        "--output-dir", str(output), "--workspace-dir", str(work / "workspace"),
        "--package-cache-dir", str(packages), "--package-manager-tree", str(tree),
        "--extra-tree", f"{kernel.moduledir}:{modules}",
        # Its vmlinuz in the tree makes mkosi filter the modules and run depmod (mkosi's
        # own RemoveFiles drops it again); without it every module goes in.
        "--extra-tree", f"{kernel.vmlinuz}:{modules}/vmlinuz",
        "--kernel-modules-exclude", ".*",
        *(f"--kernel-modules-include={m}" for m in HARNESS_MODULES),
        "--include", "mkosi-initrd", "--include", str(include),
        "build",
    ]  # fmt: skip
    log = log or work / "mkosi.log"
    env = {**os.environ, "PYTHONPATH": str(mkosi)}
    begin = time.monotonic()
    with open(log, "wb") as f:
        status = subprocess.run(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    if status != 0:
        raise MkosiError(f"mkosi failed with status {status}: {_last_error(log)} (log: {log})")
    built = output / "initrd.cpio.zst"
    if not built.is_file():
        raise MkosiError(f"mkosi left no {built} (log: {log})")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(built, out)
    with open(log, "a") as f:
        f.write(f"build.py: built {out} in {time.monotonic() - begin:.1f} s\n")
    return out


def _last_error(log: Path) -> str:
    """The line of mkosi's log that says what failed (its ‣ lines and apt's E: lines)."""
    lines = log.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith(("E: ", "‣ ")) or "Error" in line:
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def _cmd(args: argparse.Namespace) -> int:
    print(ensure_mkosi())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "mkosi",
        help=f"fetch mkosi {VERSION} from {SUITE} into the cache; print its PYTHONPATH",
        description=__doc__.splitlines()[0],
    )
    parser.set_defaults(func=_cmd)
