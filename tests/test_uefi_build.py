"""The UEFI pieces on the host (issue 10): the UKI, the ESP, the disk with an ESP, the
Secure Boot variable store and the harness's OVMF command line. Real objcopy, sbsign,
sbverify, mtools, sfdisk and virt-fw-vars; no boot (tests/test_uefi_qemu.py boots them)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pystate_build import esp, qemu_harness, secureboot, uki
from pystate_build.disk import build_disk, read_layout

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not (uki.STUB.is_file() and shutil.which("sbsign") and shutil.which("mcopy")),
    reason="needs systemd-boot-efi, sbsigntool and mtools (bash .ci/setup)",
)


def sections(efi: Path) -> dict[str, tuple[int, int]]:
    """objdump -h of a PE file: section name -> (size, VMA)."""
    out = subprocess.run(["objdump", "-h", str(efi)], capture_output=True, text=True, check=True)
    found = {}
    for match in re.finditer(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)", out.stdout, re.M):
        found[match[1]] = (int(match[2], 16), int(match[3], 16))
    return found


@given(
    osrel=st.integers(1, 0x10000),
    cmdline=st.integers(1, 4096),
    linux=st.integers(1, 64 << 20),
)
def test_section_layout_never_overlaps(osrel: int, cmdline: int, linux: int) -> None:
    sizes = {".osrel": osrel, ".cmdline": cmdline, ".linux": linux, ".initrd": 1}
    vma = uki.section_layout(0x1A000, sizes)
    order = [".osrel", ".cmdline", ".linux", ".initrd"]
    for a, b in itertools.pairwise(order):
        assert vma[a] + sizes[a] <= vma[b], (a, b, vma)
    assert all(v % 0x1000 == 0 for v in vma.values())


def test_section_layout_refuses_a_stub_that_would_overlap() -> None:
    with pytest.raises(uki.UkiError, match="past .osrel"):
        uki.section_layout(0x30000, {".osrel": 10, ".cmdline": 10, ".linux": 10, ".initrd": 1})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.TestKeys:
    return secureboot.test_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for vmlinuz: objcopy only places its bytes (the QEMU tests boot a real one)."""
    path = tmp_path_factory.mktemp("kernel") / "vmlinuz"
    path.write_bytes(b"MZ" + bytes(range(256)) * 4000)
    return path


@pytest.fixture(scope="module")
def signed_uki(
    tmp_path_factory: pytest.TempPathFactory, kernel: Path, keys: secureboot.TestKeys
) -> Path:
    work = tmp_path_factory.mktemp("uki")
    (work / "initrd").write_bytes(b"07070" + b"\0" * 5000)
    (work / "os-release").write_text('ID=test\nNAME="pystate test"\n')
    return uki.build_uki(
        work / "test.efi",
        kernel=kernel,
        initrd=work / "initrd",
        cmdline="console=ttyS0 ro quiet",
        os_release=work / "os-release",
        signing=keys.db,
    )


def test_uki_has_the_sections_at_their_addresses_and_the_command_line(
    signed_uki: Path, kernel: Path, tmp_path: Path
) -> None:
    found = sections(signed_uki)
    for name in (".osrel", ".cmdline", ".linux", ".initrd", ".text", ".sdmagic"):
        assert name in found, found
    assert found[".linux"] == (kernel.stat().st_size, uki.LINUX_VMA)
    assert found[".initrd"][1] >= uki.LINUX_VMA + kernel.stat().st_size
    # objcopy round trip of the embedded command line
    out = tmp_path / "cmdline"
    subprocess.run(
        ["objcopy", "-O", "binary", "--only-section=.cmdline", str(signed_uki), str(out)],
        check=True,
    )
    assert out.read_text() == "console=ttyS0 ro quiet\n"


def test_uki_signature_verifies_with_db_and_not_with_another_key(
    signed_uki: Path, keys: secureboot.TestKeys, tmp_path: Path
) -> None:
    ok = subprocess.run(["sbverify", "--cert", str(keys.cert("db")), str(signed_uki)], check=False)
    assert ok.returncode == 0
    _, other = secureboot.make_cert(tmp_path, "other", "not the db")
    bad = subprocess.run(
        ["sbverify", "--cert", str(other), str(signed_uki)], capture_output=True, check=False
    )
    assert bad.returncode != 0


def test_esp_holds_signed_systemd_boot_the_uki_and_loader_conf(
    signed_uki: Path, keys: secureboot.TestKeys, tmp_path: Path
) -> None:
    image = esp.build_esp(tmp_path / "esp.img", signed_uki, signing=keys.db)
    assert image.stat().st_size == esp.esp_size(signed_uki.stat().st_size)
    listing = subprocess.run(
        ["mdir", "-/", "-b", "-i", str(image), "::/"], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/systemd/systemd-bootx64.efi",
        "EFI/Linux/pystate.efi",
    ):
        assert f"::/{path}" in listing, listing
    conf = subprocess.run(
        ["mtype", "-i", str(image), "::/loader/loader.conf"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert "timeout 0" in conf
    boot = tmp_path / "BOOTX64.EFI"
    subprocess.run(["mcopy", "-i", str(image), "::/EFI/BOOT/BOOTX64.EFI", str(boot)], check=True)
    subprocess.run(["sbverify", "--cert", str(keys.cert("db")), str(boot)], check=True)
    back = tmp_path / "back.efi"
    subprocess.run(["mcopy", "-i", str(image), "::/EFI/Linux/pystate.efi", str(back)], check=True)
    assert back.read_bytes() == signed_uki.read_bytes()


def test_esp_refuses_a_name_with_a_slash(signed_uki: Path, tmp_path: Path) -> None:
    with pytest.raises(esp.EspError, match="must be a file name"):
        esp.build_esp(tmp_path / "esp.img", signed_uki, entry_name="../x.efi")


def test_disk_with_esp_first(signed_uki: Path, tmp_path: Path) -> None:
    image = esp.build_esp(tmp_path / "esp.img", signed_uki)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    layout = build_disk(tmp_path / "disk.img", root, tmp_path / "state", esp=image)
    table = read_layout(layout.path)["partitions"]
    assert [p["type"] for p in table] == [
        esp.ESP_TYPE.upper(),
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        "24436126-BB50-47E3-B47B-21DBD57591C7",
    ]
    assert table[0]["name"] == "esp" and table[0]["uuid"].lower() == layout.partitions[0].uuid
    assert layout.esp is not None and layout.esp.number == 1
    with open(layout.path, "rb") as f:
        f.seek(layout.esp.start)
        assert f.read(image.stat().st_size) == image.read_bytes()


def test_enrolled_store_has_our_keys_and_secure_boot_on(
    keys: secureboot.TestKeys, tmp_path: Path
) -> None:
    store = secureboot.enrolled_vars(tmp_path / "vars.fd", keys)
    printed = secureboot.print_store(store)
    for name in ("PK", "KEK", "db"):
        assert re.search(rf"^{name}\s+: blob", printed, re.M), printed
    assert re.search(r"^SecureBootEnable\s+: bool: ON", printed, re.M), printed
    empty = secureboot.print_store(secureboot.OVMF_VARS_EMPTY)
    assert not re.search(r"^PK\s+:", empty, re.M)


def test_adding_a_db_certificate_changes_db(keys: secureboot.TestKeys, tmp_path: Path) -> None:
    store = secureboot.enrolled_vars(tmp_path / "vars.fd", keys)

    def db_size() -> int:
        match = re.search(r"^db\s+: blob: (\d+) bytes", secureboot.print_store(store), re.M)
        assert match
        return int(match[1])

    before = db_size()
    _, cert = secureboot.make_cert(tmp_path, "db2", "second db")
    secureboot.add_db_cert(store, cert)
    assert db_size() > before


def test_qemu_argv_uefi_boots_firmware_from_the_chosen_disk(tmp_path: Path) -> None:
    fw = qemu_harness.Uefi.secure_boot(tmp_path / "template.fd")
    argv = qemu_harness.qemu_argv(
        [tmp_path / "a.img", tmp_path / "b.img"],
        tmp_path / "vmlinuz",
        None,
        "ignored",
        1024,
        None,
        uefi=fw,
        efi_vars=tmp_path / "machine.fd",
        boot_disk=1,
    )
    text = " ".join(argv)
    assert "-kernel" not in argv and "-append" not in argv
    assert "q35,smm=on" in argv
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}" in text
    assert f"unit=1,file={tmp_path / 'machine.fd'}" in text
    devices = [a for a in argv if a.startswith("virtio-blk-pci")]
    assert "bootindex" not in devices[0] and devices[1].endswith(",bootindex=1")


def test_machine_store_is_copied_once_then_kept(tmp_path: Path) -> None:
    template = tmp_path / "template.fd"
    template.write_bytes(b"template")
    fw = qemu_harness.Uefi(vars_template=template)
    store = qemu_harness.machine_vars(tmp_path / "m/efivars.fd", fw)
    assert store.read_bytes() == b"template"
    store.write_bytes(b"written by the firmware")
    qemu_harness.machine_vars(store, fw)
    assert store.read_bytes() == b"written by the firmware"


def test_qemu_boot_cli_uefi_dry_run_and_misuse(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    cli = [sys.executable, str(REPO / "qemu/boot")]
    out = subprocess.run(
        [*cli, "--uefi", "--secure-boot", str(tmp_path / "v.fd"), "--dry-run", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "OVMF_CODE_4M.secboot.fd" in out and "-kernel" not in out
    bad = subprocess.run(
        [*cli, "--uefi", "--append", "root=x", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "no --kernel, --initrd or --append" in bad.stderr
