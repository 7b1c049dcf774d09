"""build.py zipapp / tree / closure: the frozen program, the minimal root and library closures.

Real interpreter, real chroot, ldd as the oracle for closures. The tree is built
once per session (module fixture); reproducibility builds the program twice more.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, needs_root

from pystate_build.elfclosure import ClosureError, known_dlopen, library_closure
from pystate_build.freeze import (
    TARGET_PYTHON,
    FreezeReport,
    freeze,
    has_test_hooks,
    target_info,
)
from pystate_build.tree import TreeReport, build_tree

EPOCH = 1_700_000_000
TWO_MIB = 2 * 1024 * 1024
CHROOT = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "chroot"
pytestmark = pytest.mark.skipif(not TARGET_PYTHON.exists(), reason=f"{TARGET_PYTHON} missing")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> TreeReport:
    base = tmp_path_factory.mktemp("build")
    return build_tree(base / "root", freeze_dir=base / "freeze", epoch=EPOCH)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROOT, str(root), *argv],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin", "LANG": "C"},
        timeout=30,
        check=False,
    )


# --- the frozen program -------------------------------------------------------------------


def test_size_bound(tree: TreeReport) -> None:
    total = tree.freeze.program_size + tree.freeze.stdlib_size
    assert total < TWO_MIB, f"program + stdlib = {total} bytes, over 2 MiB"


@pytest.mark.parametrize("test_hooks", [False, True], ids=["production", "test-hooks"])
def test_reproducible(tmp_path: Path, test_hooks: bool) -> None:
    # A snapshot of the package, so that edits in the checkout meanwhile cannot interfere.
    package = tmp_path / "pystate_initrd"
    shutil.copytree(REPO / "pystate_initrd", package, ignore=shutil.ignore_patterns("__pycache__"))
    one = freeze(tmp_path / "one", epoch=EPOCH, package=package, test_hooks=test_hooks)
    two = freeze(tmp_path / "two", epoch=EPOCH, package=package, test_hooks=test_hooks)
    assert _sha256(one.launcher) == _sha256(two.launcher)
    assert _sha256(one.app_zip) == _sha256(two.app_zip)
    assert _sha256(one.stdlib_zip) == _sha256(two.stdlib_zip)
    later = freeze(tmp_path / "later", epoch=EPOCH + 86_400, package=package, test_hooks=test_hooks)
    assert later.app_zip.read_bytes() != one.app_zip.read_bytes()
    assert later.stdlib_zip.read_bytes() != one.stdlib_zip.read_bytes()


# --- test hooks: only in a test build (SPEC §11.10) ---------------------------------------

TEST_WORDS = (b"debug-stop", b"debug-extend-pcr", b"debug-resize-stop", b"sysrq")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _mentions(members: dict[str, bytes]) -> dict[str, list[str]]:
    return {
        word.decode(): sorted(name for name, data in members.items() if word in data)
        for word in TEST_WORDS
    }


@pytest.fixture(scope="module")
def test_build(tmp_path_factory: pytest.TempPathFactory, tree: TreeReport) -> FreezeReport:
    """A test build of the same sources, with the same epoch as the tree's production one."""
    return freeze(tmp_path_factory.mktemp("test-build"), epoch=EPOCH, test_hooks=True)


def test_production_program_holds_no_test_hook(tree: TreeReport) -> None:
    """What build.py payload/deb/tree ship: no testhooks module, and no byte of any member
    of pystate.zip or its stdlib, nor the launcher, names a test word or the sysrq trigger."""
    assert not tree.freeze.test_hooks and not has_test_hooks(tree.freeze.app_zip)
    app = _members(tree.freeze.app_zip)
    assert [n for n in app if "testhooks" in n] == []
    assert "pystate_initrd/volume/hooks.pyc" in app  # the seam is there, doing nothing
    empty = {word.decode(): [] for word in TEST_WORDS}
    assert _mentions(app) == empty
    assert _mentions(_members(tree.freeze.stdlib_zip)) == empty
    assert _mentions({"pystate": tree.freeze.launcher.read_bytes()}) == empty


def test_test_build_is_the_production_program_plus_the_hooks(
    tree: TreeReport, test_build: FreezeReport
) -> None:
    production, test = _members(tree.freeze.app_zip), _members(test_build.app_zip)
    assert test_build.test_hooks and has_test_hooks(test_build.app_zip)
    assert test_build.launcher.read_bytes() == tree.freeze.launcher.read_bytes()
    assert set(test) - set(production) == {"pystate_initrd/testhooks/__init__.pyc"}
    assert all(test[name] == data for name, data in production.items())  # byte for byte
    assert test_build.stdlib_zip.read_bytes() == tree.freeze.stdlib_zip.read_bytes()
    hooks = ["pystate_initrd/testhooks/__init__.pyc"]
    assert _mentions(test) == {word.decode(): hooks for word in TEST_WORDS}


def _run(program: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(program), *argv], capture_output=True, text=True, timeout=30, check=False
    )


def test_production_cli_rejects_debug_stop(tree: TreeReport, test_build: FreezeReport) -> None:
    """``pystate resize --debug-stop`` is an argparse error in the shipped program; a test
    build says what it is in --version."""
    program = tree.dest / "usr/bin/pystate"
    proc = _run(program, "resize", "--to", "1G", "--debug-stop", "allocate", "--state", "/none")
    assert proc.returncode == 2, proc
    assert "unrecognized arguments: --debug-stop allocate" in proc.stderr
    assert _run(program, "--version").stdout == "pystate 0.1.0\n"
    assert "(test build: test hooks included)" in _run(test_build.launcher, "--version").stdout


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["payload", "DIR"], "pystate_build.initrd.build_payload"),
        (["initrd", "OUT"], "pystate_build.initrd.build_initrd"),
        (["initrd", "--builder", "mkosi", "OUT"], "pystate_build.mkosi.build_mkosi_initrd"),
    ],
)
@pytest.mark.parametrize("flag", [False, True])
def test_build_commands_pass_test_hooks_on(
    argv: list[str], target: str, flag: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--test-hooks`` on build.py payload and initrd (both builders) reaches the builder;
    without it every builder makes the production program."""
    from build import main

    seen: list[bool] = []

    def builder(out: Path, **kwargs: object) -> Path:
        seen.append(bool(kwargs.get("test_hooks")))
        out.mkdir(parents=True, exist_ok=True)
        return out

    monkeypatch.setattr(target, builder)
    argv = [str(tmp_path / a) if a in ("DIR", "OUT") else a for a in argv]
    assert main([*argv, *(["--test-hooks"] if flag else [])]) == 0
    assert seen == [flag]


def test_shebang_and_mode(tree: TreeReport) -> None:
    with tree.freeze.launcher.open("rb") as f:
        assert f.readline() == b"#!/usr/bin/python3.11 -IS\n"
    # A plain script, not a zipapp: Python would run a zipapp's __main__ through runpy.
    assert not zipfile.is_zipfile(tree.freeze.launcher)
    assert os.readlink(tree.dest / "usr/bin/pystate") == "../lib/pystate/pystate"
    assert (tree.dest / "usr/lib/pystate/pystate").stat().st_mode & 0o7777 == 0o755
    assert (tree.dest / "usr/lib/pystate/pystate.zip").stat().st_mode & 0o7777 == 0o644


@pytest.mark.parametrize("which", ["app_zip", "stdlib_zip"])
def test_zip_entries(tree: TreeReport, which: str) -> None:
    magic = target_info().magic
    path: Path = getattr(tree.freeze, which)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        for info in infos:
            assert info.filename.endswith(".pyc"), info.filename
            assert info.external_attr >> 16 == 0o100644
            assert info.date_time == infos[0].date_time
            data = zf.read(info)
            assert data[:4] == magic, info.filename
            # PEP 552 flags: bit 0 hash-based, bit 1 check_source: 0b01 = unchecked hash.
            assert int.from_bytes(data[4:8], "little") == 0b01, info.filename


def test_zip_contents_follow_analysis(tree: TreeReport) -> None:
    analysis = tree.freeze.analysis
    with zipfile.ZipFile(tree.freeze.stdlib_zip) as zf:
        modules = {
            n.removesuffix(".pyc").removesuffix("/__init__").replace("/", ".")
            for n in zf.namelist()
        }
    assert modules == set(analysis.stdlib)
    info = target_info()
    assert not modules & info.builtin
    assert not modules & set(analysis.frozen)
    # What the interpreter needs to start, and what pystate's own imports pull in.
    assert {"encodings", "encodings.utf_8", "argparse"} <= modules
    assert "os" not in modules  # frozen into Debian's python3.11
    assert "_cffi_backend" in tree.freeze.extensions
    with zipfile.ZipFile(tree.freeze.app_zip) as zf:
        names = set(zf.namelist())
    assert "__main__.pyc" not in names  # the launcher is a script beside the zip
    assert "pystate_initrd/cli.pyc" in names
    assert not any("_ffi_build" in n for n in names)


# --- the tree -----------------------------------------------------------------------------


def test_tree_has_nothing_else_of_python(tree: TreeReport) -> None:
    pythonish = {
        f
        for f in (*tree.files, *tree.symlinks)
        if re.search(r"python|\.py|dist-packages|site-packages", f)
    }
    expected = {
        "usr/bin/python3.11",
        "usr/bin/python3",
        "usr/lib/python311.zip",
        "usr/lib/python3.11/lib-dynload/_cffi_backend.cpython-311-x86_64-linux-gnu.so",
    }
    assert expected <= pythonish
    extra = pythonish - expected
    assert all(
        re.fullmatch(r"usr/lib/python3\.11/lib-dynload/\w+\.cpython-311-\S+\.so", f) for f in extra
    )
    assert {Path(f).name.split(".")[0] for f in extra} == set(tree.freeze.extensions) - {
        "_cffi_backend"
    }


def test_tree_symlinks(tree: TreeReport) -> None:
    root = tree.dest
    assert os.readlink(root / "usr/bin/python3") == "python3.11"
    for link in ("lib", "lib64"):
        if Path("/", link).is_symlink():
            assert os.readlink(root / link) == os.readlink(Path("/", link))
    interp = root / "lib64/ld-linux-x86-64.so.2"
    assert interp.is_symlink() or interp.is_file()
    assert interp.resolve().is_relative_to(root.resolve()) or interp.is_file()
    # SONAME links kept: libffi.so.8 -> libffi.so.8.x.y, real file present.
    libffi = root / "usr/lib/x86_64-linux-gnu/libffi.so.8"
    assert libffi.is_symlink()
    assert (libffi.parent / os.readlink(libffi)).is_file()


def test_tree_describe(tree: TreeReport) -> None:
    line = tree.describe()
    assert re.match(r"program [\d.]+ KiB, stdlib [\d.]+ (KiB|MiB), tree [\d.]+ MiB", line), line


@needs_root
def test_chroot_version(tree: TreeReport) -> None:
    proc = _chroot(tree.dest, "/usr/bin/pystate", "--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "pystate 0.1.0\n", "")


@needs_root
@pytest.mark.parametrize(
    ("argv", "status"), [(["--version"], 0), (["boot"], 1)], ids=["version", "boot"]
)
def test_chroot_start_imports(tree: TreeReport, argv: list[str], status: int) -> None:
    """What the initrd runs starts without runpy (the launcher is a script) and without
    argparse (cli.py's fast paths); ``boot`` stops at /proc/cmdline, absent in the tree,
    after its imports. Modules, not times: docs/build.md "Start time" has the benchmark."""
    proc = _chroot(tree.dest, "/usr/bin/python3.11", "-IS", "-X", "importtime",
                   "/usr/bin/pystate", *argv)  # fmt: skip
    assert proc.returncode == status, proc.stderr
    imported = {
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line
    }
    assert "pystate_initrd.cli" in imported
    assert not imported & {"runpy", "argparse", "gettext", "textwrap", "shutil"}, imported
    if argv == ["boot"]:
        assert "pystate_initrd.initrd.boot" in imported
        assert "/proc/cmdline" in proc.stderr.splitlines()[-1]
    else:
        assert proc.stdout == "pystate 0.1.0\n"
        assert not imported & {"pathlib", "json"}, imported


@needs_root
def test_chroot_help(tree: TreeReport) -> None:
    proc = _chroot(tree.dest, "/usr/bin/pystate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pystate") and proc.stderr == ""


@needs_root
def test_chroot_interpreter_paths(tree: TreeReport) -> None:
    code = "import sys, encodings; print(sys.prefix, sys.exec_prefix, encodings.__file__)"
    proc = _chroot(tree.dest, "/usr/bin/python3.11", "-IS", "-c", code)
    assert proc.stderr == ""  # no "Could not find platform independent libraries"
    assert proc.stdout.split() == ["/usr", "/usr", "/usr/lib/python311.zip/encodings/__init__.pyc"]


@needs_root
def test_chroot_imports_every_package_module(tree: TreeReport) -> None:
    with zipfile.ZipFile(tree.freeze.app_zip) as zf:
        modules = sorted(
            n.removesuffix(".pyc").removesuffix("/__init__").replace("/", ".")
            for n in zf.namelist()
        )
    assert all(m.startswith("pystate_initrd") for m in modules)
    code = (
        "import importlib, sys; sys.path.insert(0, '/usr/lib/pystate/pystate.zip')\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import hashlib, json, uuid, shutil; hashlib.sha256(); print('ok')"
    )
    proc = _chroot(tree.dest, "/usr/bin/python3.11", "-IS", "-c", code)
    assert (proc.stdout, proc.stderr) == ("ok\n", "")


@needs_root
def test_chroot_cffi_backend(tree: TreeReport) -> None:
    code = "import _cffi_backend; print(_cffi_backend.__file__)"
    proc = _chroot(tree.dest, "/usr/bin/python3.11", "-IS", "-c", code)
    assert proc.stdout.startswith("/usr/lib/python3.11/lib-dynload/_cffi_backend"), proc.stderr


@needs_root
def test_chroot_payload_in_a_debian_root_with_python3_minimal(tmp_path: Path) -> None:
    """README adoption step 6, as booted.install_pystate does it: /usr/lib/pystate holds the
    payload, /usr/bin/pystate links to it; Debian's python3-minimal has no json, no _json,
    no _cffi_backend, and the program finds its frozen stdlib beside its real file."""
    from pystate_build.booted import install_pystate
    from pystate_build.initrd import build_payload
    from pystate_build.roots import build_debian_root

    root = build_debian_root(tmp_path / "root")
    install_pystate(root, build_payload(tmp_path / "payload"))
    code = "import json, _json, _cffi_backend"
    bare = _chroot(root, "/usr/bin/python3.11", "-IS", "-c", code)
    assert "ModuleNotFoundError" in bare.stderr  # what the payload has to make up for
    (root / "st/home").mkdir(parents=True)
    (root / "sr/home").mkdir(parents=True)
    proc = _chroot(root, "/usr/bin/pystate", "plan", "--state", "/st", "--sysroot", "/sr", "--json")
    assert proc.returncode == 0, proc.stderr
    mounts = json.loads(proc.stdout)["mounts"]
    assert [(m["source"], m["target"]) for m in mounts] == [("/st/home", "/home")]
    # (_cffi_backend: the QEMU test of the service, whose loop ioctls go through it)


# --- library closure ----------------------------------------------------------------------


def _ldd(binary: str) -> set[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths = set()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("linux-vdso"):
            continue
        path = line.split(" => ")[-1].split(" (")[0].strip()
        paths.add(path)
    return paths


@pytest.mark.parametrize("name", ["python3.11", "cryptsetup", "tpm2_unseal", "e2fsck", "mount"])
def test_closure_matches_ldd(name: str) -> None:
    binary = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if binary is None:
        pytest.skip(f"{name} not installed")
    got = {str(p) for p in library_closure([binary], use_known_dlopen=False)}
    assert got == _ldd(binary)


@pytest.mark.parametrize(
    ("binary", "expected"),
    [
        ("tpm2_unseal", ("libtss2-tcti-device.so.0",)),
        ("tpm2_createprimary", ("libtss2-tcti-device.so.0",)),
        ("tpm2", ("libtss2-tcti-device.so.0",)),
        ("cryptsetup", ()),
        ("python3.11", ()),
    ],
)
def test_known_dlopen_table(binary: str, expected: tuple[str, ...]) -> None:
    assert known_dlopen(f"/usr/bin/{binary}") == expected


def test_cryptsetup_brings_the_library_pystate_dlopens() -> None:
    # system/libcryptsetup.py dlopen()s this SONAME; the initrd has it wherever it has the
    # cryptsetup binary (dracut's inst_multiple, mkosi's cryptsetup-bin), by the same name.
    from pystate_initrd.system import libcryptsetup

    binary = shutil.which("cryptsetup", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if binary is None:
        pytest.skip("cryptsetup not installed")
    names = {p.name for p in library_closure([binary], use_known_dlopen=False)}
    assert libcryptsetup.LIBRARY in names
    module_setup = (REPO / "dracut-module/module-setup.sh").read_text()
    assert f'inst_libdir_file "{libcryptsetup.LIBRARY}*"' in module_setup


def test_closure_with_dlopen() -> None:
    tpm2 = shutil.which("tpm2_unseal")
    if tpm2 is None:
        pytest.skip("tpm2-tools not installed")
    plain = set(library_closure([tpm2], use_known_dlopen=False))
    full = set(library_closure([tpm2]))
    names = {p.name for p in full - plain}
    assert "libtss2-tcti-device.so.0" in names
    explicit = set(library_closure([tpm2], ["libtss2-tcti-device.so.0"], use_known_dlopen=False))
    assert explicit == full


def test_closure_cli() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "build.py"), "closure", "mount", "/usr/bin/python3.11"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    expected = library_closure(["/usr/bin/mount", "/usr/bin/python3.11"])
    assert proc.stdout.splitlines() == [str(p) for p in expected]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["closure", str(REPO / "build.py")], "is not an ELF file"),
        (["closure", "/nonexistent/binary"], "cannot read /nonexistent/binary"),
        (["closure", "no-such-tool-anywhere"], "no-such-tool-anywhere not found"),
        (["closure", "/usr/bin/mount", "--dlopen", "libnope.so.9"], "libnope.so.9, needed by"),
    ],
)
def test_closure_errors(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "build.py"), *argv], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_closure_error_type(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("not elf\n")
    with pytest.raises(ClosureError, match="not an ELF file"):
        library_closure([tmp_path / "text"])


def test_zipapp_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "build.py"), "zipapp", str(tmp_path / "z")],
        capture_output=True,
        text=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"program [\d.]+ KiB, stdlib [\d.]+ (KiB|MiB)", proc.stdout), proc.stdout
    assert (tmp_path / "z/pystate").is_file() and (tmp_path / "z/pystate.zip").is_file()
    with zipfile.ZipFile(tmp_path / "z/python311.zip") as zf:
        stamp = zf.infolist()[0].date_time
    utc = time.gmtime(EPOCH)
    assert stamp == (*utc[:5], utc[5] // 2 * 2)  # DOS time: 2-second resolution


# --- build.py bench-start (the benchmark itself runs by hand: docs/build.md) ----------------


def test_bench_start_summary() -> None:
    from pystate_build.bench_start import BARE, BOOT, VERSION, Row, render, summarise

    times = {BARE: [0.010, 0.008, 0.009], VERSION: [0.018, 0.016, 0.030], BOOT: [0.09, 0.09]}
    rows = summarise(times)
    assert rows == [
        Row(BARE, 9.0, 8.0, 10.0, 1.0),
        Row(VERSION, 18.0, 16.0, 30.0, 2.0),
        Row(BOOT, 90.0, 90.0, 90.0, 10.0),
    ]
    text = render(rows, Path("/t"), 3).splitlines()
    assert text[0] == "start time in a chroot of /t, 3 rounds, median (min-max):"
    assert text[2].split() == ["pystate", "--version", "18.0", "ms", "(16.0-30.0)", "2.00x", "bare"]


def test_bench_start_is_a_build_command() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "build.py"), "bench-start", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "--baseline" in proc.stdout, proc.stderr
