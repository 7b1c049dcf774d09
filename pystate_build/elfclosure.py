"""The shared-library closure of ELF binaries, as the dynamic loader would resolve it.

``library_closure(paths)`` reads each binary with pyelftools and resolves its
``DT_NEEDED`` entries breadth-first, the order ld.so loads them in, along the
real search path: the requester's ``DT_RPATH`` (and its loaders', when the
requester has no ``DT_RUNPATH``), then its ``DT_RUNPATH``, then the ld.so cache,
then the default directories. ``$ORIGIN``, ``$LIB`` and ``$PLATFORM`` are
expanded. A name is loaded once: later requests for the same SONAME reuse it.

The ld.so cache is read by running ``ldconfig -p`` once (not by parsing
/etc/ld.so.conf): that is the cache ld.so itself consults, with its include
globs, hwcaps subdirectories and stale-entry quirks already applied. Entries are
kept only for the binary's own ABI tag (``x86-64``), so an i386 library of the
same name is never picked.

Libraries a program dlopen()s are invisible to DT_NEEDED; ``KNOWN_DLOPEN`` lists
them per binary basename (the TPM2 TCTI for tpm2-tools) and ``dlopen=`` adds more.
Paths are reported as found (``/lib/x86_64-linux-gnu/libffi.so.8``, often a SONAME
symlink); copying them with their symlinks is the tree builder's job.

Host-only build code: never shipped in the initrd.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import os
import shutil
import subprocess
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from pystate_initrd.errors import PystateError


class ClosureError(PystateError):
    """A binary is not a dynamic ELF file, or one of its libraries cannot be found."""


# ABI of the binaries we handle: ELF class, machine, the ldconfig tag, $LIB and $PLATFORM.
_ABIS = {
    (64, "EM_X86_64"): ("x86-64", "lib/x86_64-linux-gnu", "x86_64"),
    (64, "EM_AARCH64"): ("AArch64", "lib/aarch64-linux-gnu", "aarch64"),
}

# Debian's trusted directories, searched after the cache (multiarch first, like ld.so's).
_DEFAULT_DIRS = {
    "x86-64": ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib"),
    "AArch64": ("/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib", "/usr/lib"),
}

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# Libraries loaded with dlopen(), by binary basename (fnmatch pattern). tpm2-tools link
# libtss2-tctildr, which dlopen()s the TCTI named by TPM2TOOLS_TCTI (device by default:
# /dev/tpmrm0); the TCTI's own DT_NEEDED are then resolved as usual. cryptsetup needs
# none: pystate uses no LUKS2 token plugins (SPEC §10). glibc's libnss_files is part of
# libc since 2.34, so nothing is needed for getpwnam() either.
KNOWN_DLOPEN: dict[str, tuple[str, ...]] = {
    "tpm2_*": ("libtss2-tcti-device.so.0",),
    "tpm2": ("libtss2-tcti-device.so.0",),
}


@dataclass(frozen=True)
class ElfInfo:
    """What the loader needs to know about one ELF file."""

    path: str
    abi: str
    lib: str
    platform: str
    interp: str | None
    soname: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]


def read_elf(path: str) -> ElfInfo:
    """Read the dynamic-linking facts of one ELF file (raises ClosureError if not ELF)."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            key = (elf.elfclass, elf["e_machine"])
            if key not in _ABIS:
                raise ClosureError(f"{path}: unsupported ELF class/machine {key}.")
            abi, lib, platform = _ABIS[key]
            interp = None
            soname = None
            needed: list[str] = []
            rpath: list[str] = []
            runpath: list[str] = []
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_INTERP":
                    interp = segment.get_interp_name()
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    if tag.entry.d_tag == "DT_SONAME":
                        soname = tag.soname
                    elif tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif tag.entry.d_tag == "DT_RPATH":
                        rpath.extend(p for p in tag.rpath.split(":") if p)
                    elif tag.entry.d_tag == "DT_RUNPATH":
                        runpath.extend(p for p in tag.runpath.split(":") if p)
    except OSError as exc:
        raise ClosureError(f"cannot read {path}: {exc.strerror}.") from None
    except ELFError as exc:
        raise ClosureError(f"{path} is not an ELF file: {exc}.") from None
    origin = os.path.dirname(os.path.abspath(path))
    return ElfInfo(
        path=path,
        abi=abi,
        lib=lib,
        platform=platform,
        interp=interp,
        soname=soname,
        needed=tuple(needed),
        rpath=tuple(_expand(p, origin, lib, platform) for p in rpath),
        runpath=tuple(_expand(p, origin, lib, platform) for p in runpath),
    )


def _expand(entry: str, origin: str, lib: str, platform: str) -> str:
    """Expand ld.so's dynamic string tokens in one RPATH/RUNPATH entry."""
    for token, value in (("ORIGIN", origin), ("LIB", lib), ("PLATFORM", platform)):
        entry = entry.replace("${" + token + "}", value).replace("$" + token, value)
    return entry


@functools.cache
def ld_cache() -> dict[str, dict[str, str]]:
    """The ld.so cache as {abi tag: {soname: path}}, first entry winning, from ``ldconfig -p``."""
    try:
        out = subprocess.run(
            ["ldconfig", "-p"],
            capture_output=True,
            text=True,
            check=True,
            env={"LANG": "C", "PATH": _PATH},
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ClosureError(f"ldconfig -p failed: {exc}.") from None
    cache: dict[str, dict[str, str]] = {}
    for line in out.splitlines()[1:]:
        # "\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1"
        name, sep, path = line.strip().partition(" => ")
        if not sep or " (" not in name:
            continue
        soname, _, tags = name.partition(" (")
        flags = tags.rstrip(")").split(",")
        abi = next((f for f in flags if f in _DEFAULT_DIRS), "")
        if not abi and "libc6" in flags and len(flags) == 1:
            abi = "i386"
        cache.setdefault(abi, {}).setdefault(soname, path)
    return cache


def _matches_abi(path: str, abi: str) -> bool:
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            found = _ABIS.get((elf.elfclass, elf["e_machine"]))
    except (OSError, ELFError):
        return False
    return found is not None and found[0] == abi


def _search(name: str, requester: ElfInfo, loaders: Sequence[ElfInfo]) -> str | None:
    """Where ld.so finds ``name`` when ``requester`` (loaded by ``loaders``) needs it."""
    if "/" in name:
        return name if os.path.exists(name) else None
    dirs: list[str] = []
    if not requester.runpath:
        # DT_RPATH of the requester, then of each object that loaded it, up to the program.
        for obj in (requester, *reversed(loaders)):
            if not obj.runpath:
                dirs.extend(obj.rpath)
    dirs.extend(requester.runpath)
    for d in dirs:
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate) and _matches_abi(candidate, requester.abi):
            return os.path.normpath(candidate)
    cached = ld_cache().get(requester.abi, {}).get(name)
    if cached is not None and os.path.exists(cached):
        return cached
    for d in _DEFAULT_DIRS[requester.abi]:
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate) and _matches_abi(candidate, requester.abi):
            return candidate
    return None


def known_dlopen(binary: str | os.PathLike[str]) -> tuple[str, ...]:
    """The libraries ``KNOWN_DLOPEN`` says the binary dlopen()s, by its basename."""
    base = os.path.basename(binary)
    names: list[str] = []
    for pattern, libs in KNOWN_DLOPEN.items():
        if fnmatch.fnmatchcase(base, pattern):
            names.extend(lib for lib in libs if lib not in names)
    return tuple(names)


def library_closure(
    paths: Iterable[str | os.PathLike[str]],
    dlopen: Iterable[str] = (),
    *,
    use_known_dlopen: bool = True,
) -> list[Path]:
    """The libraries (and ELF interpreters) the binaries need, sorted, as absolute paths.

    ``dlopen`` names extra libraries (SONAMEs or paths) loaded at run time; with
    ``use_known_dlopen`` those of ``KNOWN_DLOPEN`` are added too. The binaries
    themselves are not in the result unless another one needs them. Raises
    ClosureError naming the library and who needs it when one cannot be found.
    """
    binaries = [os.path.abspath(p) for p in paths]
    extra = list(dlopen)
    if use_known_dlopen:
        for binary in binaries:
            extra.extend(known_dlopen(binary))
    result: set[str] = set()
    # Each binary is its own program: its own loader chain and its own namespace.
    for binary in binaries:
        info = read_elf(binary)
        seen: set[str] = set()
        queue: deque[tuple[ElfInfo, tuple[ElfInfo, ...], str]] = deque(
            (info, (), name) for name in info.needed
        )
        if info.interp:
            # ld.so is loaded first; libc's DT_NEEDED on it matches its SONAME.
            result.add(info.interp)
            seen.add(read_elf(info.interp).soname or os.path.basename(info.interp))
        # dlopen()ed libraries resolve as if the program itself asked for them.
        queue.extend((info, (), name) for name in extra)
        while queue:
            requester, loaders, name = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            path = _search(name, requester, loaders)
            if path is None:
                raise ClosureError(
                    f"{name}, needed by {requester.path}, not found in its search path."
                )
            result.add(path)
            lib = read_elf(path)
            chain = (*loaders, requester)
            queue.extend((lib, chain, n) for n in lib.needed)
    return sorted(Path(p) for p in result)


def _cmd_closure(args: argparse.Namespace) -> int:
    binaries = []
    for name in args.binary:
        found = name if "/" in name else shutil.which(name, path=_PATH)
        if found is None:
            raise ClosureError(f"{name} not found in {_PATH}.")
        binaries.append(found)
    for path in library_closure(binaries, args.dlopen, use_known_dlopen=not args.no_known_dlopen):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "closure",
        help="print the shared-library closure of ELF binaries",
        description="Print the libraries the binaries need (DT_NEEDED along the real search "
        "path, the ELF interpreter and known dlopen() dependencies), one path per line.",
    )
    parser.add_argument("binary", nargs="+", help="ELF executables or libraries")
    parser.add_argument(
        "--dlopen",
        action="append",
        default=[],
        metavar="NAME",
        help="a library loaded with dlopen() (SONAME or path); repeatable",
    )
    parser.add_argument(
        "--no-known-dlopen",
        action="store_true",
        help="leave out the built-in table of dlopen() dependencies (e.g. tpm2_* → TCTI)",
    )
    parser.set_defaults(func=_cmd_closure)
