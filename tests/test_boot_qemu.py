"""Real boots (issue 3): Debian's kernel, a real dracut initrd with the pystate module,
a GPT disk with an erofs root and a state partition, under QEMU TCG.

Each test builds its disk (sub-second, sparse) and boots once; the initrds are built
once per session. (The mkosi-initrd and a Debian root boot in test_encrypted_qemu.py, which
covers what a Debian boot with plain /home showed here.) Failures are made to end the boot
at once with ``rd.shell=0 rd.emergency=poweroff``, and the console is searched for pystate's
one-line reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import needs_root

from pystate_build import qemu_harness as harness
from pystate_build.disk import DiskLayout, build_disk
from pystate_build.initrd import build_initrd
from pystate_build.qemu_machine import FAIL_FAST
from pystate_build.roots import TESTROOT_MARKER, build_testroot, parse_report

pytestmark = [pytest.mark.qemu, needs_root]


@pytest.fixture(scope="session")
def tpm_optional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """These boots are first boots without a TPM (no swtpm), which stop by default
    (SPEC §11.1): their initrds carry a pystate.conf with ``[tpm2] required = no``, and go
    on with the plain entries, as every test here expects."""
    conf = tmp_path_factory.mktemp("conf") / "pystate.conf"
    conf.write_text("[tpm2]\nrequired = no\n")
    return conf


@pytest.fixture(scope="session")
def initrd_systemd(tmp_path_factory: pytest.TempPathFactory, tpm_optional: Path) -> Path:
    return build_initrd(
        tmp_path_factory.mktemp("initrd") / "systemd.img", systemd=True, conf=tpm_optional
    )


@pytest.fixture(scope="session")
def initrd_shell(tmp_path_factory: pytest.TempPathFactory, tpm_optional: Path) -> Path:
    return build_initrd(
        tmp_path_factory.mktemp("initrd") / "shell.img", systemd=False, conf=tpm_optional
    )


@pytest.fixture(scope="session")
def testroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_testroot(
        tmp_path_factory.mktemp("testroot") / "root", lists=["/home", "/etc", "/opt"]
    )


def boot(
    layout: DiskLayout, initrd: Path, tmp_path: Path, *, expect: Sequence[str] = (), extra: str = ""
) -> harness.BootResult:
    assert layout.root is not None
    append = f"root=PARTUUID={layout.root.uuid} rootfstype=erofs ro {FAIL_FAST} {extra}"
    return harness.boot(
        layout.path,
        initrd=initrd,
        append=append,
        tpm=False,
        expect=expect,
        timeout=240,
        log=tmp_path / "console.log",
    )


def home_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    (state / "home/alice").mkdir(parents=True)
    (state / "home/alice/notes").write_text("from the state partition\n")
    os.chown(state / "home/alice", 1000, 1000)
    os.chown(state / "home/alice/notes", 1000, 1000)
    return state


def assert_home_bound(result: harness.BootResult, state_device: str = "/dev/vda2") -> None:
    assert result.ok, harness.describe(result)
    mounts, listed, files = parse_report(result.console)
    by_target = {m[1]: m for m in mounts}
    assert by_target["/"][2] == "erofs"
    assert by_target["/home"][0] == state_device
    assert "nosuid" in by_target["/home"][3] and "nodev" in by_target["/home"][3]
    assert listed["/home/alice"] == ("755", "1000:1000", "directory")
    assert files["/home/alice/notes"] == "from the state partition"
    assert "pystate: finished (ok)" in result.console
    # No TPM, [tpm2] required = no: an error line, and the boot went on (SPEC §11.1).
    assert "pystate: no TPM2 on this machine" in result.console


@pytest.mark.parametrize("state_fs", ["ext4", "btrfs", "xfs"])
def test_systemd_initrd_binds_home(
    state_fs: str, initrd_systemd: Path, testroot: Path, tmp_path: Path
) -> None:
    layout = build_disk(tmp_path / "disk.img", testroot, home_state(tmp_path), state_fs=state_fs)
    result = boot(layout, initrd_systemd, tmp_path, expect=[TESTROOT_MARKER])
    assert_home_bound(result)
    assert "probe done in" in result.console and f": {state_fs} " in result.console


def test_shell_initrd_binds_home(initrd_shell: Path, testroot: Path, tmp_path: Path) -> None:
    layout = build_disk(tmp_path / "disk.img", testroot, home_state(tmp_path))
    result = boot(layout, initrd_shell, tmp_path, expect=[TESTROOT_MARKER])
    assert_home_bound(result)
    assert "systemd[1]" not in result.console  # really dracut's shell init


def test_dirty_state_fs_is_repaired_by_fsck(
    initrd_systemd: Path, testroot: Path, tmp_path: Path
) -> None:
    layout = build_disk(tmp_path / "disk.img", testroot, home_state(tmp_path))
    assert layout.state is not None
    # Flag the state file system as having errors: e2fsck -p must do a full check first.
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(layout.state.start),
         "--sizelimit", str(layout.state.size), str(layout.path)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        subprocess.run(
            ["debugfs", "-w", "-R", "ssv state 2", loop], check=True, capture_output=True
        )
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    result = boot(layout, initrd_systemd, tmp_path, expect=[TESTROOT_MARKER])
    assert_home_bound(result)
    assert "fsck done in" in result.console
    assert "fsck done in" in result.console and ": corrected" in result.console


def test_two_state_partitions_on_root_disk_stop_boot(
    initrd_systemd: Path, testroot: Path, tmp_path: Path
) -> None:
    state = home_state(tmp_path)
    layout = build_disk(tmp_path / "disk.img", testroot, state, extra_states=[state])
    uuids = [p.uuid for p in layout.states]
    assert len(uuids) == 2
    result = boot(layout, initrd_systemd, tmp_path)
    assert TESTROOT_MARKER not in result.console
    stop = [line for line in result.console.splitlines() if "pystate: boot stopped:" in line]
    assert stop, harness.describe(result)
    assert all(u in stop[0] for u in uuids), stop[0]


@pytest.mark.parametrize("kind", ["systemd", "shell"])
def test_no_state_partition_stops_boot(
    kind: str, testroot: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A disk without a state partition: the stop says why none was made. The systemd
    initrd has systemd-repart, but this OS image ships no definition; the shell initrd has
    no repart at all (the factory-fresh boot with a definition: test_factory_qemu.py)."""
    initrd: Path = request.getfixturevalue(f"initrd_{kind}")
    layout = build_disk(tmp_path / "disk.img", testroot, None)
    result = boot(layout, initrd, tmp_path)
    assert TESTROOT_MARKER not in result.console
    stop = [line for line in result.console.splitlines() if "pystate: boot stopped:" in line]
    assert stop, harness.describe(result)
    assert "no partition of type 24436126-bb50-47e3-b47b-21dbd57591c7 on /dev/vda" in stop[0]
    assert "the disk of the root file system" in stop[0], stop[0]
    if kind == "systemd":
        assert "in the OS image, and /sysroot has none" in stop[0], stop[0]
    else:
        assert "this initrd has no systemd-repart to make one" in stop[0], stop[0]


def test_hostile_state_tree(initrd_systemd: Path, testroot: Path, tmp_path: Path) -> None:
    state = home_state(tmp_path)
    (state / "etc").mkdir()  # plain /etc: not on the allowlist
    (state / "etc/planted").write_text("attacker\n")
    os.symlink("/etc", state / "opt")  # a symlink entry
    (state / "srv").write_text("a file where a directory belongs\n")
    (state / "home-\\x2e\\x2e").mkdir()  # decodes to /home/..
    (state / "usr").mkdir()  # forbidden target
    layout = build_disk(tmp_path / "disk.img", testroot, state)
    result = boot(layout, initrd_systemd, tmp_path, expect=[TESTROOT_MARKER])
    assert_home_bound(result)
    for name in ("etc", "opt", "srv", "home-\\x2e\\x2e", "usr"):
        assert f"rejected plain entry '{name}'" in result.console.replace("\\\\", "\\"), name
    mounts, listed, _ = parse_report(result.console)
    assert {m[1] for m in mounts if m[0] == "/dev/vda2"} == {"/state", "/home"}
    assert "/etc/planted" not in listed
    assert listed["/opt"][2] == "directory"  # the image's own /opt, not the symlink
