"""The mkosi-initrd drop-in without booting: what mkosi 24.3 itself reads from it, the one
unit file it shares with the dracut module, and the apt source build.py derives to fetch
mkosi. (Booting it: the ``mkosi`` parameter of tests/test_boot_qemu.py and
tests/test_encrypted_qemu.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pystate_build import REPO
from pystate_build.mkosi import (
    DROP_IN,
    PYTHON,
    MkosiError,
    backports_sources,
    mkosi_path,
    stage_drop_in,
)


def _payload(tmp_path: Path) -> Path:
    """A stand-in payload directory: the drop-in only links to it."""
    payload = tmp_path / "payload"
    (payload / "lib-dynload").mkdir(parents=True)
    (payload / "pystate").write_text("#!/usr/bin/python3.11 -IS\n")
    (payload / "pystate.zip").write_bytes(b"")
    (payload / "python311.zip").write_bytes(b"")
    return payload


def test_drop_in_links_point_at_what_the_package_installs() -> None:
    assert os.readlink(DROP_IN / "payload") == "/usr/lib/pystate"
    assert (
        os.readlink(DROP_IN / "pystate.service")
        == "/usr/lib/dracut/modules.d/90pystate/pystate.service"
    )
    assert os.readlink(DROP_IN / "mkosi.extra/usr/bin/pystate") == "../lib/pystate/pystate"


def test_one_unit_file_serves_dracut_and_mkosi(tmp_path: Path) -> None:
    staged = stage_drop_in(tmp_path / "include", _payload(tmp_path))
    drop_in = staged / "mkosi.conf.d/50-pystate"
    unit = drop_in / "pystate.service"
    assert unit.resolve() == (REPO / "dracut-module/pystate.service").resolve()
    assert (drop_in / "payload").resolve() == (tmp_path / "payload").resolve()
    text = unit.read_text()
    assert "After=sysroot.mount" in text and "WantedBy=initrd-root-fs.target" in text
    # mkosi-initrd ends with 99-mkosi.preset (disable *): ours must sort before it.
    presets = sorted(p.name for p in (drop_in / "mkosi.extra").rglob("*.preset"))
    assert presets == ["50-pystate.preset"] and presets[0] < "99-mkosi.preset"
    preset = (drop_in / "mkosi.extra/usr/lib/systemd/system-preset/50-pystate.preset").read_text()
    assert "enable pystate.service" in preset.splitlines()


@pytest.mark.skipif(
    not (mkosi_path() / "mkosi").is_dir(), reason="mkosi not fetched (build.py mkosi)"
)
def test_mkosi_reads_the_drop_in(tmp_path: Path) -> None:
    """mkosi 24.3's own parser: the packages, trees and modules pystate needs are added to
    mkosi-initrd's, and the symlinks are followed to the payload and the dracut unit."""
    conf = tmp_path / "pystate.conf"
    conf.write_text("[tpm2]\nrequired = no\n")
    staged = stage_drop_in(tmp_path / "include", _payload(tmp_path), conf=conf)
    assert (staged / "mkosi.conf.d/60-pystate-conf/mkosi.extra/etc/pystate/pystate.conf").is_file()
    argv = [
        PYTHON, "-m", "mkosi", "--directory", "", "--distribution", "debian",
        "--release", "bookworm", "--include", "mkosi-initrd", "--include", str(staged),
        "--json", "summary",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(mkosi_path())}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    image = json.loads(done.stdout)["Images"][-1]
    packages = set(image["Packages"])
    assert {"python3.11-minimal", "libffi8", "libtss2-esys-3.0.2-0", "libtss2-rc0"} <= packages
    assert {"libtss2-tctildr0", "libtss2-tcti-device0"} <= packages  # ESAPI and its TCTI
    assert {"cryptsetup-bin", "e2fsprogs", "btrfs-progs", "coreutils", "systemd"} <= packages
    trees = {t["Target"]: Path(t["Source"]) for t in image["ExtraTrees"] if t["Target"]}
    assert trees["/usr/lib/pystate"] == (tmp_path / "payload").resolve()
    unit = trees["/usr/lib/systemd/system/pystate.service"]
    assert unit == (REPO / "dracut-module/pystate.service").resolve()
    extras = [Path(t["Source"]) for t in image["ExtraTrees"] if not t["Target"]]
    assert staged / "mkosi.conf.d/50-pystate/mkosi.extra" in extras
    assert staged / "mkosi.conf.d/60-pystate-conf/mkosi.extra" in extras  # --conf's drop-in
    assert r"/tpm_tis\.ko" in image["KernelModulesInclude"]


def test_backports_source_is_derived_from_the_machines_sources(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n"
        "Components: main\n"
    )
    (apt / "sources.list").write_text(
        "deb [signed-by=/k.gpg] http://other.invalid/debian bookworm main\n"
        "# deb http://commented.invalid/debian bookworm main\n"
    )
    text = backports_sources(apt)
    stanzas = text.strip().split("\n\n")
    assert len(stanzas) == 2, text
    assert "URIs: http://mirror.invalid/debian\nSuites: bookworm-backports\n" in stanzas[0]
    assert "Components: main contrib" in stanzas[0] and "Signed-By: /usr/share/keyrings" in text
    assert "URIs: http://other.invalid/debian\n" in stanzas[1] and "Signed-By: /k.gpg" in text
    assert "security" not in text and "commented" not in text


def test_no_bookworm_source_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    with pytest.raises(MkosiError, match="no bookworm source in"):
        backports_sources(tmp_path)


def test_builder_mkosi_refuses_a_shell_initrd(capsys: pytest.CaptureFixture[str]) -> None:
    from build import main

    assert main(["initrd", "--builder", "mkosi", "--no-systemd", "out.img"]) == 1
    err = capsys.readouterr().err
    assert err == "build.py: --builder mkosi makes a systemd initrd with pystate only\n"
