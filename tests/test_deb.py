"""build.py deb: the Debian package as dpkg and lintian see it, installed in a real Debian root.

The package is built once (module fixture, ~10 s: the freeze); the reproducibility test
builds it twice more. The install test runs the root's own dpkg in a chroot of the cached
mmdebstrap root (pystate_build/roots.py), so it needs root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, needs_root

from pystate_build import deb as debmod

EPOCH = 1_700_000_000
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
ARCH = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
).stdout.strip()

# path in the package: (mode, type) as `dpkg-deb -c` prints them
EXPECTED = {
    "./usr/lib/pystate/pystate": "-rwxr-xr-x",
    "./usr/lib/pystate/pystate.zip": "-rw-r--r--",
    "./usr/lib/pystate/python311.zip": "-rw-r--r--",
    "./usr/lib/pystate/lib-dynload/_cffi_backend.cpython-311-x86_64-linux-gnu.so": "-rw-r--r--",
    "./usr/lib/pystate/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so": "-rw-r--r--",
    "./usr/bin/pystate": "lrwxrwxrwx",
    "./usr/lib/dracut/modules.d/90pystate/module-setup.sh": "-rwxr-xr-x",
    "./usr/lib/dracut/modules.d/90pystate/pystate-hook.sh": "-rwxr-xr-x",
    "./usr/lib/dracut/modules.d/90pystate/pystate.service": "-rw-r--r--",
    "./usr/lib/dracut/modules.d/90pystate/systemd-repart-pystate.conf": "-rw-r--r--",
    "./usr/lib/systemd/system/pystate-resized.service": "-rw-r--r--",
    "./usr/lib/repart.d/50-pystate-state.conf": "-rw-r--r--",
    "./usr/share/man/man1/pystate.1.gz": "-rw-r--r--",
    "./usr/share/doc/pystate/copyright": "-rw-r--r--",
    "./usr/share/doc/pystate/changelog.gz": "-rw-r--r--",
    "./usr/share/doc/pystate/README.md": "-rw-r--r--",
    "./usr/share/doc/pystate/resize.md": "-rw-r--r--",
}
MKOSI_DROPIN = "./usr/lib/mkosi-initrd/mkosi.conf.d/50-pystate/"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return debmod.build_deb(tmp_path_factory.mktemp("deb"), epoch=EPOCH)


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)


def _listing(package: Path) -> dict[str, tuple[str, str, str]]:
    """{path: (mode, owner, link target or "")} from `dpkg-deb -c`."""
    rows = {}
    for line in _run("dpkg-deb", "-c", str(package)).stdout.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(maxsplit=5)
        path, _, target = rest.partition(" -> ")
        rows[path] = (mode, owner, target)
    return rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_name_is_name_version_arch(package: Path) -> None:
    assert package.name == f"pystate_{VERSION}_{ARCH}.deb"


def test_listing_has_every_path_with_its_mode(package: Path) -> None:
    listing = _listing(package)
    for path, mode in EXPECTED.items():
        assert path in listing, f"{path} missing from the package"
        assert listing[path][0] == mode, path
    assert {owner for _, owner, _ in listing.values()} == {"root/root"}
    assert listing["./usr/bin/pystate"][2] == "../lib/pystate/pystate"
    # every symlink relative (Debian Policy 10.5) and pointing inside the package (except
    # those of mkosi.extra/, which point inside the initrd mkosi builds)
    for path, (mode, _, target) in listing.items():
        if mode.startswith("l"):
            assert not target.startswith("/"), path
            if "/mkosi.extra/" not in path:
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
                assert f"./{resolved}" in listing or f"./{resolved}/" in listing, path


def test_repart_definition_is_in_repart_d_and_not_in_the_dracut_module(
    package: Path, tmp_path: Path
) -> None:
    """systemd-repart reads /usr/lib/repart.d of the OS image; the dracut module's directory
    is no place for it (dracut would not install it, and nothing reads it there)."""
    listing = _listing(package)
    assert [p for p in listing if "50-pystate-state.conf" in p] == [
        "./usr/lib/repart.d/50-pystate-state.conf",
    ]
    assert "./usr/lib/repart.d/" in listing
    # the module holds repart's ordering drop-in for the initrd, never the definition
    assert [p for p in listing if p.startswith("./usr/lib/dracut/") and "repart" in p] == [
        "./usr/lib/dracut/modules.d/90pystate/systemd-repart-pystate.conf"
    ]
    assert _run("dpkg-deb", "-x", str(package), str(tmp_path)).returncode == 0
    shipped = tmp_path / "usr/lib/repart.d/50-pystate-state.conf"
    assert (
        shipped.read_bytes() == (REPO / "dracut-module/repart.d/50-pystate-state.conf").read_bytes()
    )


def test_mkosi_dropin_is_packaged_when_the_repository_has_one(package: Path) -> None:
    listing = _listing(package)
    source = REPO / "mkosi-initrd"
    if not source.is_dir():
        assert not any(p.startswith(MKOSI_DROPIN) for p in listing)
        pytest.skip("no mkosi-initrd/ in this checkout yet")
    files = sorted(p.relative_to(source) for p in source.rglob("*") if not p.is_dir())
    assert files
    for rel in files:
        assert f"{MKOSI_DROPIN}{rel}" in listing


def test_control_fields(package: Path) -> None:
    def field(name: str) -> str:
        return _run("dpkg-deb", "-f", str(package), name).stdout.strip()

    assert field("Package") == "pystate"
    assert field("Version") == VERSION
    assert field("Architecture") == ARCH
    depends = [d.split()[0] for d in field("Depends").split(", ")]
    for needed in ("python3.11", "e2fsprogs", "cryptsetup-bin", "libc6", "libffi8"):
        assert needed in depends, field("Depends")
    assert "tpm2-tools" in field("Recommends")
    assert "dracut-core | mkosi" in field("Suggests")
    assert int(field("Installed-Size")) > 1000  # KiB: the payload is ~1.5 MiB
    assert "@" in field("Maintainer")


def test_lintian_finds_no_error(package: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.fail("lintian is not installed (.ci/setup installs it)")
    proc = _run("lintian", "--fail-on", "error", "--no-tag-display-limit", str(package))
    assert proc.returncode == 0, f"lintian:\n{proc.stdout}{proc.stderr}"


def test_maintainer_scripts_pass_shellcheck(package: Path, tmp_path: Path) -> None:
    _run("dpkg-deb", "-e", str(package), str(tmp_path / "DEBIAN")).check_returncode()
    scripts = sorted(
        str(p) for p in (tmp_path / "DEBIAN").iterdir() if p.name.endswith(("inst", "rm"))
    )
    assert len(scripts) == 3  # postinst, prerm, postrm
    proc = _run("shellcheck", *scripts)
    assert proc.returncode == 0, proc.stdout


def test_reproducible(package: Path, tmp_path: Path) -> None:
    again = debmod.build_deb(tmp_path / "again", epoch=EPOCH)
    assert _sha256(again) == _sha256(package)


def test_unpacked_package_is_what_the_initrd_builder_reads(tmp_path: Path) -> None:
    root = debmod.unpacked_package(tmp_path / "unpacked")
    module = root / "usr/lib/dracut/modules.d/90pystate"
    assert (module / "module-setup.sh").stat().st_mode & 0o111
    payload = root / "usr/lib/pystate"
    assert sorted(p.name for p in payload.iterdir()) == [
        "lib-dynload", "pystate", "pystate.zip", "python311.zip"
    ]  # fmt: skip
    # the launcher runs by its symlink, with pystate.zip and the stdlib beside its real file
    assert (payload / "pystate").read_bytes().startswith(b"#!/usr/bin/python3.11 -IS\n")
    proc = _run(str(root / "usr/bin/pystate"), "--version")
    assert proc.stdout == f"pystate {VERSION}\n", proc.stderr


@needs_root
def test_installs_runs_and_purges_in_a_debian_root(package: Path, tmp_path: Path) -> None:
    """The root's own dpkg installs it (python3-minimal only: the python3.11 dependency is
    the one ignored), the postinst enables the resize unit, the program runs with the root's
    python3.11, dpkg verifies every file, and a purge leaves nothing behind."""
    from pystate_build.booted import install_pystate
    from pystate_build.roots import build_debian_root

    root = build_debian_root(tmp_path / "root")

    def chroot(*argv: str) -> subprocess.CompletedProcess[str]:
        return _run("chroot", str(root), *argv)

    install_pystate(root, package)
    status = chroot("dpkg-query", "-W", "-f=${db:Status-Abbrev}${Version}", "pystate").stdout
    assert status.strip() == f"ii {VERSION}"
    version = chroot("/usr/bin/pystate", "--version")
    assert version.stdout == f"pystate {VERSION}\n", version.stderr
    assert chroot("/usr/bin/python3.11", "-c", "import json").returncode != 0  # python3-minimal
    wants = root / "etc/systemd/system/multi-user.target.wants/pystate-resized.service"
    assert wants.is_symlink()
    definition = root / "usr/lib/repart.d/50-pystate-state.conf"
    assert definition.is_file()
    assert str(wants.readlink()).endswith("/systemd/system/pystate-resized.service")
    verify = chroot("dpkg", "--verify", "pystate")
    assert (verify.returncode, verify.stdout) == (0, ""), verify.stdout + verify.stderr

    purge = chroot("dpkg", "--purge", "pystate")
    assert purge.returncode == 0, purge.stderr
    assert not (root / "usr/lib/pystate").exists()
    assert not (root / "usr/bin/pystate").is_symlink()
    assert not wants.is_symlink()
    assert not definition.exists()


def test_the_package_holds_no_test_hooks(package: Path, tmp_path: Path) -> None:
    from pystate_build.freeze import has_test_hooks

    assert _run("dpkg-deb", "-x", str(package), str(tmp_path)).returncode == 0
    assert not has_test_hooks(tmp_path / "usr/lib/pystate/pystate.zip")


def test_a_test_build_payload_is_never_packaged(tmp_path: Path) -> None:
    """build.py deb --payload with a payload made by build.py payload --test-hooks: refused."""
    from pystate_build.initrd import build_payload

    payload = build_payload(tmp_path / "payload", freeze_dir=tmp_path / "freeze", test_hooks=True)
    with pytest.raises(debmod.DebError, match=r"is a test build \(build.py payload --test-hooks\)"):
        debmod.build_deb(tmp_path / "out", payload=payload, epoch=EPOCH)
    assert not list((tmp_path / "out").glob("*.deb"))
