"""A device as it leaves the factory (issue 11): the disk holds the ESP and the OS only; the
state partition is made, and remade, on the device itself.

- machine F (UEFI, systemd-boot, two UKIs: the normal entry and pystate-factory-reset.efi,
  whose command line adds ``pystate.factory-reset=1``; a 32 GiB sparse disk; the initrd's
  pystate.conf puts /etc in overlay mode):
  boot 1: systemd-repart in the initrd makes the state partition from the repart.d
  definition pystate ships (installed in the OS image), pystate provisions it, /etc is an
  overlay; boot 2: unlocks by TPM with no prompt on the same partition, the line written in
  /etc in boot 1 kept in the overlay's upper layer, and ``pystate factory-reset --yes`` run
  in the booted system arms a one-shot reset; boot 3: systemd-boot boots the reset entry once,
  pystate crypto-erases and provisions afresh; boot 4: the reset entry made the default (a
  persistent reset word): refused, a normal unlock.
- a disk with less free space than the definition's minimum: repart makes nothing, pystate
  stops with a clear message, and the disk's bytes are unchanged.

About 5 UEFI boots of 60-90 s each under TCG.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root
from test_encrypted_qemu import KEY_FILE, report_of, state_fs, steps

from pystate_build import REPO, secureboot
from pystate_build import qemu_harness as harness
from pystate_build.bench_unlock import build_initrd_in
from pystate_build.disk import DiskLayout, build_disk, data_segments, read_layout, reread_layout
from pystate_build.qemu_machine import FAIL_FAST, Machine
from pystate_build.roots import (
    TESTROOT_MARKER,
    build_testroot,
    console_value,
    lines_kept,
    parse_report,
)
from pystate_build.tree import build_tree
from pystate_build.uefi import ENTRY, build_uefi_boot
from pystate_initrd.formats import recovery
from pystate_initrd.formats.gpt import STATE_TYPE_GUID

pytestmark = [
    pytest.mark.qemu,
    needs_root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
    pytest.mark.skipif(not secureboot.OVMF_CODE_SECBOOT.is_file(), reason="no OVMF"),
    pytest.mark.skipif(shutil.which("systemd-repart") is None, reason="no systemd-repart"),
]

GIB = 1 << 30
MIB = 1 << 20
DEFINITION = REPO / "dracut-module/repart.d/50-pystate-state.conf"
RESET_ENTRY = "pystate-factory-reset.efi"
KEPT = "/etc/kept"  # every boot appends a line, in the overlay's upper layer
RUN = "/home/.testroot-run"  # a command for the booted system, put there by the host
WORDS = f"ro {FAIL_FAST} testroot.list=/etc/os-release,{KEY_FILE} testroot.write={KEPT}:x"
CONF = """\
[layout /etc]
mode = overlay

[layout /var]

[layout /home]
area = plain
seed = no
"""
PYSTATE_VENDOR = "8d901e04-0f5c-45b8-9bac-ca374402d770"
LOADER_VENDOR = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
REQUEST_VAR = f"PystateFactoryReset-{PYSTATE_VENDOR}"
LUKS2_MAGIC = b"LUKS\xba\xbe\x00\x02"  # the primary header's magic and version
ONESHOT_VAR = f"LoaderEntryOneShot-{LOADER_VENDOR}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("factory")


@pytest.fixture(scope="module")
def initrd(work: Path) -> Path:
    conf = work / "pystate.conf"
    conf.write_text(CONF)
    return build_initrd_in(work / "initrd-work", work / "initrd.img", conf=conf)


@pytest.fixture(scope="module")
def root(work: Path) -> Path:
    """The test root with pystate (for `pystate factory-reset`) and the repart definition,
    where the Debian package installs it."""
    root = build_testroot(work / "root")
    build_tree(root, freeze_dir=work / "freeze")
    (root / "usr/lib/repart.d").mkdir(parents=True)
    shutil.copy2(DEFINITION, root / "usr/lib/repart.d" / DEFINITION.name)
    return root


def factory_disk(
    work: Path, root: Path, initrd: Path, *, size: int | None = None, free: int = 0
) -> DiskLayout:
    """The disk as it leaves the factory: ESP and root only, ``size`` bytes or ``free``
    bytes unpartitioned after the root."""
    chain = build_uefi_boot(
        work / "uefi",
        initrd=initrd,
        os_release=root / "etc/os-release",
        cmdline=f"{WORDS} testroot.run={RUN}",
        secure_boot=False,
        extra={RESET_ENTRY: "pystate.factory-reset=1"},
        default=ENTRY,
    )
    return build_disk(work / "disk.img", root, None, esp=chain.esp, size=size, free=free)


@pytest.fixture(scope="module")
def machine_f(work: Path, root: Path, initrd: Path) -> Iterator[Machine]:
    tmp = work / "machine-f"
    tmp.mkdir()
    layout = factory_disk(tmp, root, initrd, size=32 * GIB)
    yield Machine("F", layout, initrd, tmp, uefi=harness.Uefi(), timeout=420)


def gpt_digest(layout: DiskLayout) -> str:
    """The partition tables (primary and backup), hashed."""
    h = hashlib.sha256()
    with open(layout.path, "rb") as f:
        h.update(f.read(MIB))
        f.seek(layout.size - MIB)
        h.update(f.read(MIB))
    return h.hexdigest()


def mounts_by_target(console: str) -> dict[str, list[str]]:
    mounts, _, _ = parse_report(console)
    return {row[1]: row for row in mounts}


def luks_headers_opened_by(layout: DiskLayout, key: str, work: Path) -> int:
    """How many LUKS2 headers anywhere on the state partition (in a file or in blocks a
    deleted file freed) the recovery key ``key`` opens: every 4 KiB-aligned primary header
    is cut out with its keyslot area and tried with cryptsetup."""
    state = layout.state
    assert state is not None
    passphrase = recovery.recovery_passphrase(key)
    opened = 0
    with open(layout.path, "rb") as f:
        for first, last in data_segments(f.fileno(), state.start, state.start + state.size):
            for block in range(first - (first - state.start) % 4096, last, 4096):
                f.seek(block)
                if f.read(len(LUKS2_MAGIC)) != LUKS2_MAGIC:
                    continue
                f.seek(block)
                cut = work / "header.img"
                cut.write_bytes(f.read(16 * MIB))
                tried = subprocess.run(
                    ["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(cut)],
                    input=bytes(passphrase),
                    capture_output=True,
                    check=False,
                )
                opened += tried.returncode == 0
    return opened


# --- machine F ----------------------------------------------------------------------------


def test_factory_fresh_disk_gets_its_state_partition_from_repart_and_is_provisioned(
    machine_f: Machine,
) -> None:
    m = machine_f
    before = reread_layout(m.layout)
    assert [p.role for p in before.partitions] == ["esp", "root"]  # as it left the factory
    result = m.boot()
    assert result.ok, harness.describe(result)
    after = reread_layout(m.layout)
    state = after.state
    assert state is not None and state.number == 3, after
    # The host reads what repart made, with pystate's parser and with sfdisk.
    table = {p["node"][-1]: p for p in read_layout(m.layout.path)["partitions"]}
    assert table["3"]["type"].lower() == str(STATE_TYPE_GUID) == state.type_uuid
    assert table["3"]["name"] == state.name == "state"
    # It fills the free space: from the root's end to the backup GPT, 4 KiB-aligned.
    root = after.root
    assert root is not None
    assert state.start - (root.start + root.size) < MIB
    assert m.layout.size - (state.start + state.size) < 2 * MIB, state
    partition = report_of(result)["partition"]
    assert isinstance(partition, dict)
    assert partition["device"] == "/dev/vda3" and partition["rule"] == "loader", partition
    assert partition["part_uuid"] == state.uuid
    s = steps(result)
    assert s["commit"]["ok"] and str(s["seal"]["detail"]) == "to sha256:7,15", s
    # /etc is an overlay: the image's own /etc below, the encrypted entry above.
    mounts = mounts_by_target(result.console)
    assert mounts["/etc"][2] == "overlay", mounts["/etc"]
    assert mounts["/var"][0] == "/dev/mapper/pystate-encrypted", mounts["/var"]
    assert mounts["/home"][0] == "/dev/vda3", mounts["/home"]
    _, listed, files = parse_report(result.console)
    assert files["/etc/os-release"].startswith(("NAME=", "ID=", "PRETTY")), files
    assert lines_kept(result.console, KEPT) == 0
    m.recovery_key = files[KEY_FILE]
    m.layout = after
    m.results["gpt"] = {"digest": gpt_digest(after), "state": state.uuid}
    m.done.add("provision")


def test_second_boot_unlocks_the_same_partition_keeps_etc_and_arms_a_reset(
    machine_f: Machine,
) -> None:
    m = machine_f
    m.need("provision")
    with state_fs(m.layout, write=True) as mnt:
        # the command for the booted system, on the plain /home entry
        (mnt / "home" / Path(RUN).name).write_text("/usr/bin/pystate factory-reset --yes\n")
    result = m.boot()
    assert result.ok, harness.describe(result)
    s = steps(result)
    assert "recovery" not in s, s  # no prompt: the TPM unsealed
    assert str(s["unseal"]["detail"]).startswith("token 0 (sha256:7,15)"), s
    # repart found the partition it made and left it (and the table) alone
    assert gpt_digest(m.layout) == m.results["gpt"]["digest"]
    assert report_of(result)["partition"]["part_uuid"] == m.results["gpt"]["state"]  # type: ignore[index]
    # the line boot 1 wrote in /etc, kept in the overlay's upper layer (the encrypted entry)
    assert lines_kept(result.console, KEPT) == 1
    assert mounts_by_target(result.console)["/etc"][2] == "overlay"
    _, _, files = parse_report(result.console)
    assert files["/etc/os-release"].startswith(("NAME=", "ID=", "PRETTY")), files
    # `pystate factory-reset --yes` armed the one-shot entry in the firmware's store
    assert console_value(result.console, "RUN") == "0", result.console[-3000:]
    store = secureboot.store_variables(m.efi_vars)
    assert store[ONESHOT_VAR] == f"{RESET_ENTRY}\0".encode("utf-16-le"), store.get(ONESHOT_VAR)
    assert REQUEST_VAR in store
    m.done.add("armed")


def test_one_shot_factory_reset_erases_and_provisions_afresh(machine_f: Machine) -> None:
    m = machine_f
    m.need("armed")
    with state_fs(m.layout, write=True) as mnt:
        (mnt / "home/planted").write_text("a plain file the reset must remove\n")
    old_key = m.recovery_key
    result = m.boot()
    assert result.ok, harness.describe(result)
    command_line = console_value(result.console, "CMDLINE") or ""
    assert "pystate.factory-reset=1" in command_line  # systemd-boot booted the reset entry
    s = steps(result)
    assert s["factory-reset"]["ok"], s
    assert "encrypted.img" in str(s["factory-reset"]["detail"]), s
    assert s["commit"]["ok"] and "unseal" not in s, s  # provisioned, not unlocked
    assert lines_kept(result.console, KEPT) == 0  # the old /etc upper layer is gone
    _, _, files = parse_report(result.console)
    new_key = files[KEY_FILE]
    assert new_key != old_key
    with state_fs(m.layout) as mnt:
        assert not (mnt / "home/planted").exists()
        assert not (mnt / ".pystate/factory-reset").exists()
    # crypto-erase: no LUKS header left on the partition opens with the old recovery key,
    # not even the old image's, in the blocks it freed; the new one opens with the new key
    assert luks_headers_opened_by(m.layout, old_key, m.work) == 0
    assert luks_headers_opened_by(m.layout, new_key, m.work) == 1
    # one shot: systemd-boot consumed the entry, pystate the request
    store = secureboot.store_variables(m.efi_vars)
    assert ONESHOT_VAR not in store and REQUEST_VAR not in store, sorted(store)
    m.recovery_key = new_key
    m.done.add("reset")


def test_a_persistent_reset_word_is_refused_and_the_boot_unlocks(machine_f: Machine) -> None:
    """The reset entry made the default: its word is on every boot's command line, with no
    request behind it (SPEC §11.6). pystate says so and unlocks; nothing is erased."""
    m = machine_f
    m.need("reset")
    esp = m.layout.esp
    assert esp is not None
    conf = m.work / "loader.conf"
    conf.write_text(f"timeout 0\ndefault {RESET_ENTRY}\n")
    subprocess.run(
        ["mcopy", "-o", "-i", f"{m.layout.path}@@{esp.start}", str(conf), "::/loader/loader.conf"],
        check=True,
    )
    result = m.boot()
    assert result.ok, harness.describe(result)
    assert "pystate.factory-reset=1" in (console_value(result.console, "CMDLINE") or "")
    assert "pystate.factory-reset=1 ignored" in result.console
    s = steps(result)
    assert "factory-reset" not in s and "recovery" not in s and s["luks-open"]["ok"], s
    assert lines_kept(result.console, KEPT) == 1  # boot 3's line: nothing was erased


# --- no room for the state partition -------------------------------------------------------


def test_no_room_for_the_state_partition_stops_clearly_and_touches_nothing(
    work: Path, root: Path, initrd: Path
) -> None:
    tmp = work / "machine-full"
    tmp.mkdir()
    # 512 MiB free: less than the definition's SizeMinBytes
    layout = factory_disk(tmp, root, initrd, free=512 * MIB)
    with open(layout.path, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    m = Machine("full", layout, initrd, tmp, uefi=harness.Uefi(), timeout=420)
    result = m.boot(expect=())
    assert TESTROOT_MARKER not in result.console  # stopped in the initrd
    stop = [line for line in result.console.splitlines() if "pystate: boot stopped:" in line]
    assert stop, harness.describe(result)
    assert "no partition of type 24436126-bb50-47e3-b47b-21dbd57591c7 on /dev/vda" in stop[0]
    assert "its largest unpartitioned extent is 5" in stop[0], stop[0]  # 5xx MiB
    assert "SizeMinBytes=1 GiB free in one piece, so it touched nothing" in stop[0], stop[0]
    with open(layout.path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == before
    assert [p.role for p in reread_layout(layout).partitions] == ["esp", "root"]
