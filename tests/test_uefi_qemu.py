"""pystate in the boot chain that image-based distributions ship (issue 10): OVMF with Secure
Boot, systemd-boot, a signed UKI, the root found by systemd-gpt-auto-generator through
``LoaderDevicePartUUID`` (no ``root=``), and a TPM policy on a PCR 7 that the firmware measures.

- machine U (Secure Boot on, our test PK/KEK/db): boot 1 provisions; boot 2 unlocks by TPM;
  then a certificate is added to the machine's db on the host (a change the firmware measures
  into PCR 7): boot 3 is refused by the TPM, says PCR 7 changed, takes the recovery key and
  re-seals; boot 4 unlocks by TPM again. A line appended to /var in every boot shows what each
  boot kept, and the variable store shows what systemd-boot wrote in it.
- machine D (UEFI without Secure Boot): two disks with a state partition each, booted from the
  ESP of the second: the state partition on the boot loader's disk is taken (SPEC §2 rule 2).

About 5 UEFI boots of 60-100 s each under TCG (OVMF's Secure Boot build emulates SMM).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import needs_root
from test_encrypted_qemu import KEY_FILE, report_of, state_names, steps

from pystate_build import qemu_harness as harness
from pystate_build import secureboot
from pystate_build.bench_unlock import STATE_SIZE, build_initrd_in
from pystate_build.disk import build_disk, read_layout
from pystate_build.qemu_machine import FAIL_FAST, Machine
from pystate_build.roots import build_testroot, console_value, lines_kept, parse_report
from pystate_build.uefi import build_uefi_boot

pytestmark = [
    pytest.mark.qemu,
    needs_root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
    pytest.mark.skipif(not secureboot.OVMF_CODE_SECBOOT.is_file(), reason="no OVMF"),
]

KEPT = "/var/lib/app/kept"  # every boot appends a line (testroot.write)
UKI_WORDS = f"ro quiet {FAIL_FAST} testroot.list=/state/encrypted/.pystate testroot.write={KEPT}:x"


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("uefi-initrd")
    return build_initrd_in(work, work / "initrd.img")


def _root(tmp: Path) -> Path:
    root = build_testroot(tmp / "root")
    (root / "var/lib/app").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def machine_u(initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Machine:
    tmp = tmp_path_factory.mktemp("machine-u")
    root = _root(tmp)
    chain = build_uefi_boot(
        tmp / "uefi", initrd=initrd, os_release=root / "etc/os-release", cmdline=UKI_WORDS
    )
    (tmp / "state").mkdir()
    layout = build_disk(tmp / "disk.img", root, tmp / "state", state_size=STATE_SIZE, esp=chain.esp)
    m = Machine("U", layout, initrd, tmp, uefi=chain.firmware, timeout=420)
    return m


# --- machine U: Secure Boot, PCR 7 --------------------------------------------------------


def test_secure_boot_uki_first_boot_provisions_with_root_from_the_loader(
    machine_u: Machine,
) -> None:
    m = machine_u
    result = m.boot()
    assert result.ok, harness.describe(result)
    assert console_value(result.console, "SECUREBOOT") == "1"  # the firmware's variable
    m.results["pcr7"] = {"sealed": console_value(result.console, "PCR7")}
    # The UKI's command line, as the kernel got it: no root=; systemd-gpt-auto-generator
    # found the root partition on the boot loader's disk.
    command_line = next(x for x in result.console.splitlines() if "PYSTATE-CMDLINE" in x)
    assert "root=" not in command_line and "testroot.write" in command_line, command_line
    partition = report_of(result)["partition"]
    assert isinstance(partition, dict)
    assert partition["device"] == "/dev/vda3" and partition["rule"] == "loader", partition
    assert partition["part_uuid"] == m.layout.partitions[2].uuid, partition
    mounts, listed, files = parse_report(result.console)
    by_target = {row[1]: row for row in mounts}
    assert by_target["/var"][0] == "/dev/mapper/pystate-encrypted", by_target
    assert by_target["/"][:3] == ["/dev/vda2", "/", "erofs"], by_target["/"]
    assert lines_kept(result.console, KEPT) == 0
    s = steps(result)
    assert str(s["seal"]["detail"]) == "to sha256:7,15", s
    m.recovery_key = files[KEY_FILE]
    assert state_names(m.layout) == ["encrypted", "encrypted.img", "home", "lost+found"]
    # EFI variables live in the machine's own store and outlast the boot.
    assert "LoaderEntryLastBooted" in secureboot.print_store(m.efi_vars)
    m.done.add("provision")


def test_secure_boot_second_boot_unlocks_by_tpm(machine_u: Machine) -> None:
    m = machine_u
    m.need("provision")
    result = m.boot()
    assert result.ok, harness.describe(result)
    assert console_value(result.console, "SECUREBOOT") == "1"
    assert console_value(result.console, "PCR7") == m.results["pcr7"]["sealed"]
    s = steps(result)
    assert "recovery key" not in result.console
    assert str(s["unseal"]["detail"]).startswith("token 0 (sha256:7,15)"), s
    assert lines_kept(result.console, KEPT) == 1  # boot 1's line, kept in encrypted /var
    m.done.add("unlock")


def test_new_db_certificate_changes_pcr7_recovery_key_reseals(
    machine_u: Machine, tmp_path: Path
) -> None:
    m = machine_u
    m.need("unlock")
    # What a firmware or key update in the field does: one more certificate in db.
    _, cert = secureboot.make_cert(tmp_path, "db2", "pystate test db, second")
    secureboot.add_db_cert(m.efi_vars, cert)
    result = m.boot(answers=[f"(try 1 of 3):={m.recovery_key}"])
    assert result.ok, harness.describe(result)
    assert console_value(result.console, "SECUREBOOT") == "1"  # still on: only db changed
    assert console_value(result.console, "PCR7") != m.results["pcr7"]["sealed"]
    s = steps(result)
    detail = str(s["unseal"]["detail"])
    assert "PCR policy check failed" in detail, s
    # which PCR changed, from the sealed values in the token, and which firmware event did
    assert "PCR 7 changed since sealing" in detail, detail
    assert 'EV_EFI_VARIABLE_DRIVER_CONFIG "db" differs' in detail, detail
    assert s["recovery"]["ok"] and s["reseal"]["ok"], s
    assert lines_kept(result.console, KEPT) == 2
    m.done.add("reseal")


def test_boot_after_the_reseal_unlocks_by_tpm_again(machine_u: Machine) -> None:
    m = machine_u
    m.need("reseal")
    result = m.boot()
    assert result.ok, harness.describe(result)
    s = steps(result)
    assert "recovery key" not in result.console and "recovery" not in s, s
    assert s["unseal"]["ok"], s
    assert lines_kept(result.console, KEPT) == 3


# --- machine D: two disks, the boot loader's wins -------------------------------------------


def test_state_partition_on_the_boot_loaders_disk_is_taken(initrd: Path, tmp_path: Path) -> None:
    root = _root(tmp_path)
    chain = build_uefi_boot(
        tmp_path / "uefi",
        initrd=initrd,
        os_release=root / "etc/os-release",
        cmdline=f"ro quiet {FAIL_FAST}",
        secure_boot=False,
    )
    (tmp_path / "state").mkdir()
    (tmp_path / "other-state/home/other").mkdir(parents=True)
    other = build_disk(
        tmp_path / "other.img", None, tmp_path / "other-state", state_size=STATE_SIZE
    )
    boot = build_disk(
        tmp_path / "boot.img", root, tmp_path / "state", state_size=STATE_SIZE, esp=chain.esp
    )
    tables = {p: read_layout(p) for p in (other.path, boot.path)}
    m = Machine("D", boot, initrd, tmp_path, uefi=chain.firmware, boot_disk=1, timeout=420)
    # vda: the other disk, first in the machine; vdb: the disk the firmware boots.
    result = m.boot(disk=[other.path, boot.path])
    assert result.ok, harness.describe(result)
    assert console_value(result.console, "SECUREBOOT") == "0"
    partition = report_of(result)["partition"]
    assert isinstance(partition, dict)
    assert partition["disk"] == "/dev/vdb" and partition["rule"] == "loader", partition
    assert partition["device"] == "/dev/vdb3", partition
    assert boot.state is not None and partition["part_uuid"] == boot.state.uuid, partition
    mounts, _, _ = parse_report(result.console)
    assert {row[1]: row[0] for row in mounts}["/home"] == "/dev/vdb3"
    assert state_names(boot) == ["encrypted", "encrypted.img", "home", "lost+found"]
    assert state_names(other) == ["home", "lost+found"]  # the other disk's state: untouched
    for path, table in tables.items():
        assert read_layout(path) == table, f"{path}: partition table changed"
    esp = next(p for p in read_layout(boot.path)["partitions"] if p["node"].endswith("1"))
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", esp
