"""Encrypted state in real boots (issue 4): QEMU TCG, swtpm, a systemd dracut initrd.

Provisioning, the TPM unlock, the recovery prompt and the Debian first boot also run with the
initrd made by mkosi-initrd and the drop-in ``mkosi-initrd/`` (parameter ``mkosi``, machine M:
the same steps as machine A's first three).

Two machines, each one disk and one swtpm state kept across its boots, booted in order
(the tests of a machine build on each other; a later one skips when an earlier failed):

- machine A: first boot provisions (/etc, /var from the image, /home plain); the second
  unlocks by TPM and writes a file; a changed PCR 7 asks for the recovery key (answered on
  the console), re-seals, and the file of boot 2 is there; the next boot with the same PCR
  unlocks by TPM again; without a TPM three wrong keys stop the boot, image unchanged.
  Then copies of its disk: a damaged LUKS header, a corrupted inner file system (both stop,
  image bytes unchanged), and machine B's image swapped in (boots by B's recovery key, and
  PCR 15 is no longer zero, so A's sealed key is out of reach).
- machine B: the power is cut (``pystate.debug-stop``, sysrq o) after allocate, after
  layout and after commit; the next boots end with one complete image, unlocked by TPM.
  Then a cut inside the re-seal after a recovery unlock, right after the new keyslot was
  added: the next boot proves that keyslot through the TPM and adopts it, nothing leaks.

Machines A, B and M use a hook (a PCR extend, power cuts): their initrds are test builds
(``build.py initrd --test-hooks``); the Debian and shell boots run the production program.

About 12 boots of 25-45 s; each initrd is built once (~30 s).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import test_tpm2_session
from conftest import BUILDERS, needs_root

from pystate_build import qemu_harness as harness
from pystate_build.bench_unlock import STATE_SIZE, build_initrd_in
from pystate_build.disk import DiskLayout, build_disk
from pystate_build.fault_host import state_mounted as state_fs  # also test_factory_qemu's
from pystate_build.qemu_machine import Machine
from pystate_build.roots import TESTROOT_MARKER, boot_json, build_testroot, parse_report
from pystate_initrd.formats import recovery, tpm2_policy
from pystate_initrd.system import luks

pytestmark = [
    pytest.mark.qemu,
    needs_root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

KEY_FILE = "/state/encrypted/.pystate/recovery-key"
PCR7 = "/sys/class/tpm/tpm0/pcr-sha256/7"
PCR15 = "/sys/class/tpm/tpm0/pcr-sha256/15"


def image_digest(layout: DiskLayout, disk: Path | None = None) -> str:
    with state_fs(layout, disk) as mnt:
        h = hashlib.sha256()
        with open(mnt / "encrypted.img", "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()


def state_names(layout: DiskLayout) -> list[str]:
    with state_fs(layout) as mnt:
        return sorted(p.name for p in mnt.iterdir())


def report_of(result: harness.BootResult) -> dict[str, object]:
    report = boot_json(result.console)
    assert report is not None, harness.describe(result)
    return report


def steps(result: harness.BootResult) -> dict[str, dict[str, object]]:
    return {s["name"]: s for s in report_of(result)["steps"]}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The production dracut initrd: the package's module and payload."""
    work = tmp_path_factory.mktemp("initrd-work")
    return build_initrd_in(work, work / "initrd.img")


@pytest.fixture(scope="module")
def hooks_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's dracut module with a test-hooks payload (PCR extends, power cuts)."""
    work = tmp_path_factory.mktemp("hooks-initrd-work")
    return build_initrd_in(work, work / "initrd.img", test_hooks=True)


def _machine(name: str, initrd: Path, tmp: Path) -> Machine:
    root = build_testroot(tmp / "root")
    (root / "etc/hostname").write_text("from-the-image\n")
    (root / "var/lib/app").mkdir(parents=True)
    (root / "var/lib/app/state").write_text("seeded from the image\n")
    (tmp / "state/home/alice").mkdir(parents=True)
    layout = build_disk(tmp / "disk.img", root, tmp / "state", state_size=STATE_SIZE)
    return Machine(name, layout, initrd, tmp)


@pytest.fixture(scope="module")
def machine_a(hooks_initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Machine:
    return _machine("A", hooks_initrd, tmp_path_factory.mktemp("machine-a"))


@pytest.fixture(scope="module")
def machine_m(mkosi_initrd_test_hooks: Path, tmp_path_factory: pytest.TempPathFactory) -> Machine:
    return _machine("M", mkosi_initrd_test_hooks, tmp_path_factory.mktemp("machine-m"))


@pytest.fixture(scope="module", params=BUILDERS)
def machine(request: pytest.FixtureRequest) -> Machine:
    """Machine A (dracut) or M (mkosi): the tests that take it run with both initrds."""
    m: Machine = request.getfixturevalue("machine_a" if request.param == "dracut" else "machine_m")
    return m


@pytest.fixture(scope="module", params=BUILDERS)
def systemd_initrd(request: pytest.FixtureRequest) -> Path:
    """The dracut or the mkosi systemd initrd, built only when a test asks for it."""
    path: Path = request.getfixturevalue("initrd" if request.param == "dracut" else "mkosi_initrd")
    return path


@pytest.fixture(scope="module")
def machine_b(hooks_initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Machine:
    return _machine("B", hooks_initrd, tmp_path_factory.mktemp("machine-b"))


# --- machine A ----------------------------------------------------------------------------


def test_first_boot_provisions_and_seeds(machine: Machine) -> None:
    m = machine
    result = m.boot("testroot.list=/etc,/var,/home,/state/encrypted/.pystate")
    assert result.ok, harness.describe(result)
    mounts, listed, files = parse_report(result.console)
    by_target = {row[1]: row for row in mounts}
    for target in ("/etc", "/var", "/state/encrypted"):
        assert by_target[target][0] == "/dev/mapper/pystate-encrypted", by_target
    assert by_target["/home"][0] == "/dev/vda2"
    assert files["/etc/hostname"] == "from-the-image"
    assert files["/var/lib/app/state"] == "seeded from the image"
    assert listed[KEY_FILE][:2] == ("400", "0:0")
    assert listed["/state/encrypted/.pystate"][0] == "700"
    m.recovery_key = files[KEY_FILE]
    assert len(m.recovery_key) == 71
    s = steps(result)
    for name in ("seal", "allocate", "luks-format", "mkfs", "layout", "commit", "measure-pcr15"):
        assert s[name]["ok"], s
    assert state_names(m.layout) == ["encrypted", "encrypted.img", "home", "lost+found"]
    m.done.add("provision")


def test_second_boot_unlocks_by_tpm_and_writes(machine: Machine) -> None:
    m = machine
    m.need("provision")
    trace = m.work / "swtpm-trace.log"
    result = m.boot("testroot.write=/var/lib/app/boot2:written-in-boot-2", tpm_trace=trace)
    assert result.ok, harness.describe(result)
    assert "PYSTATE-WROTE /var/lib/app/boot2" in result.console
    s = steps(result)
    assert "recovery" not in s and "recovery key" not in result.console
    for name in ("unseal", "luks-open", "inner-fsck", "mount-encrypted", "measure-pcr15"):
        assert s[name]["ok"], s
    assert str(s["unseal"]["detail"]).startswith("token 0 (sha256:7,15)")
    # ESAPI in process (issue 13): no TPM process, and on the guest's /dev/tpmrm0 the one
    # TPM2_Unseal is authorized by a session salted with the parent and carrying the
    # encrypt attribute alone, so the secret in its response is encrypted.
    assert s["unseal"]["processes"] == 0 and s["measure-pcr15"]["processes"] == 0, s
    bus = list(test_tpm2_session.exchanges(trace.read_text(errors="replace")))
    unseals = [c for c, _ in bus if int.from_bytes(c[6:10], "big") == TPM_CC_UNSEAL]
    assert len(unseals) == 1 and test_tpm2_session.session_attributes(unseals[0]) == [0x40]
    sessions = [c for c, _ in bus if int.from_bytes(c[6:10], "big") == TPM_CC_START_AUTH]
    salted = [c for c in sessions if _salt_size(c) > 0 and c[10:14] != TPM_RH_NULL]
    assert salted, "no salted TPM2_StartAuthSession on the bus"
    m.done.add("unlock")


TPM_CC_UNSEAL, TPM_CC_START_AUTH = 0x15E, 0x176
TPM_RH_NULL = (0x40000007).to_bytes(4, "big")


def _salt_size(command: bytes) -> int:
    """TPM2_StartAuthSession (no sessions): tpmKey, bind, then nonceCaller, encryptedSalt."""
    nonce = int.from_bytes(command[18:20], "big")
    return int.from_bytes(command[20 + nonce : 22 + nonce], "big")


def test_changed_pcr_asks_for_the_recovery_key_then_reseals(machine_m: Machine) -> None:
    # mkosi's initrd only: the dracut initrd meets a changed PCR 7 for real, measured by
    # the firmware after a db update, in test_uefi_qemu.py.
    m = machine_m
    m.need("unlock")
    result = m.boot(
        "pystate.debug-extend-pcr=7",
        "testroot.list=/var/lib/app",
        answers=[f"(try 1 of 3):={m.recovery_key}"],
    )
    assert result.ok, harness.describe(result)
    s = steps(result)
    assert "PCR policy check failed" in str(s["unseal"]["detail"])
    assert "PCR 7 changed since sealing (sealed " in str(s["unseal"]["detail"])  # issue 10
    assert s["recovery"]["ok"] and s["reseal"]["ok"], s
    _, _, files = parse_report(result.console)
    assert files["/var/lib/app/boot2"] == "written-in-boot-2"  # boot 2's file, in boot 3
    # PCR 7 stays changed (as after a firmware update): the TPM unlocks again, no prompt.
    again = m.boot("pystate.debug-extend-pcr=7")
    assert again.ok, harness.describe(again)
    s = steps(again)
    assert "recovery" not in s and s["luks-open"]["ok"], s
    m.done.add("recovery")


def test_no_tpm_three_wrong_keys_stop_and_change_nothing(machine_a: Machine) -> None:
    m = machine_a
    m.need("provision")
    before = image_digest(m.layout)
    wrong = "cbcbcbcb-" * 7 + "cbcbcbcb"
    result = m.boot(
        tpm=False,
        answers=[f"(try {i} of 3):={wrong}" for i in (1, 2, 3)],
        expect=(),
    )
    assert TESTROOT_MARKER not in result.console  # stopped in the initrd (and powered off)
    assert "no valid recovery key was given" in result.console, harness.describe(result)
    assert result.console.count("that recovery key does not open") >= 3
    assert "no TPM2" in result.console
    assert image_digest(m.layout) == before


def _copy(m: Machine, name: str) -> Path:
    copy = m.work / name
    subprocess.run(["cp", "--sparse=always", str(m.layout.path), str(copy)], check=True)
    return copy


def _poke_image(m: Machine, disk: Path, offset: int, data: bytes) -> None:
    with state_fs(m.layout, disk, write=True) as mnt, open(mnt / "encrypted.img", "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_damaged_luks_header_stops_clearly_and_writes_nothing(machine_a: Machine) -> None:
    m = machine_a
    m.need("provision")
    disk = _copy(m, "damaged-header.img")
    _poke_image(m, disk, 4096 + 64, b"\x00garbage\x00")  # the primary header's JSON area
    before = image_digest(m.layout, disk)
    result = m.boot(disk=disk, expect=())
    assert TESTROOT_MARKER not in result.console  # stopped in the initrd (and powered off)
    assert "copy of the LUKS2 header" in result.console and "damaged" in result.console
    assert image_digest(m.layout, disk) == before
    disk.unlink()


def test_corrupted_inner_fs_stops_clearly_and_writes_nothing(machine_a: Machine) -> None:
    m = machine_a
    m.need("provision")
    disk = _copy(m, "corrupt-inner.img")
    with state_fs(m.layout, disk) as mnt:
        offset = luks.read_header(mnt / "encrypted.img").data_offset
    _poke_image(m, disk, offset, bytes(4096))  # the inner superblock's sector: garbage
    before = image_digest(m.layout, disk)
    result = m.boot(disk=disk, expect=())  # the TPM unseals: only the inner fs is damaged
    assert TESTROOT_MARKER not in result.console  # stopped in the initrd (and powered off)
    assert "holds no ext4 or btrfs file system" in result.console, harness.describe(result)
    assert image_digest(m.layout, disk) == before
    disk.unlink()


# --- machine B: power cuts during provisioning ----------------------------------------------


@pytest.mark.parametrize("step", ["allocate", "layout"])
def test_power_cut_before_commit_leaves_no_image(machine_b: Machine, step: str) -> None:
    m = machine_b
    result = m.boot(f"pystate.debug-stop={step}", expect=())
    assert f"debug-stop after {step}" in result.console, harness.describe(result)
    assert TESTROOT_MARKER not in result.console
    names = state_names(m.layout)
    assert "encrypted.img" not in names and "encrypted.img.new" in names
    m.done.add(f"cut-{step}")


def test_power_cut_after_commit_leaves_a_complete_image(machine_b: Machine) -> None:
    m = machine_b
    m.need("cut-allocate", "cut-layout")
    result = m.boot("pystate.debug-stop=commit", expect=())
    assert "debug-stop after commit" in result.console, harness.describe(result)
    names = state_names(m.layout)
    assert "encrypted.img" in names and "encrypted.img.new" not in names
    # The next boot finds one complete image and unlocks it by TPM.
    result = m.boot("testroot.list=/state/encrypted/.pystate,/etc")
    assert result.ok, harness.describe(result)
    s = steps(result)
    assert "seal" not in s and s["luks-open"]["ok"] and "recovery" not in s, s
    _, _, files = parse_report(result.console)
    assert files["/etc/hostname"] == "from-the-image"
    m.recovery_key = files[KEY_FILE]
    m.done.add("complete")


# --- swapped image --------------------------------------------------------------------------


def test_swapped_image_boots_by_its_key_but_cannot_reach_the_real_seal(
    machine_a: Machine, machine_b: Machine
) -> None:
    a, b = machine_a, machine_b
    a.need("provision")
    b.need("complete")
    disk = _copy(a, "swapped.img")
    with state_fs(a.layout) as mnt:
        real_token = json.loads(luks.token_export(mnt / "encrypted.img", 0))
    assert 15 in real_token["tpm2-pcrs"] and real_token["pystate-pcr15"] is True
    with state_fs(b.layout) as b_mnt, state_fs(a.layout, disk, write=True) as mnt:
        (mnt / "encrypted.img").unlink()
        subprocess.run(
            ["cp", "--sparse=always", str(b_mnt / "encrypted.img"), str(mnt / "encrypted.img")],
            check=True,
        )
        # The attacker copies the real token into their image (pointing at their keyslot 0:
        # cryptsetup refuses a token for a keyslot that does not exist), so pystate unseals
        # the real secret, which then fails to open the attacker's keyslot.
        attack = {**real_token, "keyslots": ["0"]}
        luks.token_import(mnt / "encrypted.img", json.dumps(attack), 0, replace=True)
    result = a.boot(
        f"testroot.list={PCR15},{PCR7}",
        disk=disk,
        answers=[f"(try 1 of 3):={b.recovery_key}"],
    )
    assert result.ok, harness.describe(result)
    s = steps(result)
    assert s["unseal"]["ok"] and "does not open keyslot" in str(s["luks-open"]["detail"]), s
    assert s["recovery"]["ok"] and s["measure-pcr15"]["ok"], s
    # Inside that boot PCR 15 holds the swapped volume's measurement, not zero: the real
    # token's policy (PCR 15 = 0) can no longer be satisfied until the next power cycle.
    _, _, files = parse_report(result.console)
    pcr7, pcr15 = bytes.fromhex(files[PCR7]), bytes.fromhex(files[PCR15])
    assert pcr15 != bytes(32)
    sealed_policy = bytes.fromhex(real_token["tpm2-policy-hash"])
    assert tpm2_policy.policy_pcr_digest("sha256", {7: pcr7, 15: pcr15}) != sealed_policy
    # ...and PCR 15 is the only obstacle: with it at zero the policy would be met.
    assert tpm2_policy.policy_pcr_digest("sha256", {7: pcr7, 15: bytes(32)}) == sealed_policy
    # PCR 15 is exactly zero extended by HMAC(volume key, "pystate:<uuid>") of B's image
    # (the volume key from B's header with B's recovery key: luksDump needs no dm).
    with state_fs(a.layout, disk) as mnt:
        image = mnt / "encrypted.img"
        vk = luks.volume_key(image, key=recovery.recovery_passphrase(b.recovery_key), key_slot=1)
        measurement = tpm2_policy.measure_volume(vk, luks.uuid(image))
    assert pcr15 == hashlib.sha256(bytes(32) + measurement).digest()
    disk.unlink()


def header_of(layout: DiskLayout) -> tuple[list[int], list[str]]:
    """The image's keyslots and token types, read from the disk image on the host."""
    with state_fs(layout) as mnt:
        header = luks.read_header(mnt / "encrypted.img")
    tokens = header.metadata["tokens"].values()
    return sorted(int(k) for k in header.metadata["keyslots"]), [t["type"] for t in tokens]


def test_power_cut_inside_the_reseal_is_finished_by_the_next_boot(machine_b: Machine) -> None:
    # PCR 7 changes; the recovery key opens the image; the re-seal is cut right after it
    # added the new keyslot, before the token names it (a keyslot nobody could use).
    m = machine_b
    m.need("complete")  # after the swapped-image test, which wants B's keyslot 0
    recover = [f"(try 1 of 3):={m.recovery_key}"]
    result = m.boot(
        "pystate.debug-extend-pcr=7", "pystate.debug-stop=reseal-add-keyslot",
        answers=recover, expect=(),
    )  # fmt: skip
    assert "debug-stop after reseal-add-keyslot" in result.console, harness.describe(result)
    assert header_of(m.layout) == ([0, 1, 2], ["pystate-tpm2", "pystate-reseal"])
    # The next boot (PCR 7 changed the same way): the old seal is refused, the recovery key
    # opens, and the journal proves keyslot 2 through the TPM: it is adopted, no new seal.
    result = m.boot("pystate.debug-extend-pcr=7", answers=recover)
    assert result.ok, harness.describe(result)
    s = steps(result)
    assert s["recovery"]["ok"] and "proven" in str(s["reseal-finish"]["detail"]), s
    assert "reseal" not in s and "seal" not in s, s
    assert header_of(m.layout) == ([1, 2], ["pystate-tpm2"])  # nothing leaked
    # And the TPM unlocks by keyslot 2 from then on.
    result = m.boot("pystate.debug-extend-pcr=7")
    assert result.ok, harness.describe(result)
    s = steps(result)
    assert "recovery" not in s and "reseal-finish" not in s, s
    assert "keyslot 2" in str(s["luks-open"]["detail"]), s


# --- the real OS ------------------------------------------------------------------------------


def test_debian_first_boot_has_etc_and_var_from_the_image(
    systemd_initrd: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from pystate_build.roots import DEBIAN_MARKER, build_debian_root

    tmp = tmp_path_factory.mktemp("debian")
    root = build_debian_root(tmp / "root", lists=["/state/encrypted/.pystate"])
    (tmp / "state/home/alice").mkdir(parents=True)
    layout = build_disk(tmp / "disk.img", root, tmp / "state", state_size=STATE_SIZE)
    m = Machine("debian", layout, systemd_initrd, tmp)
    result = m.boot(expect=(DEBIAN_MARKER,))
    assert result.ok, harness.describe(result)
    assert "PYSTATE-DEBIAN-TARGET multi-user.target active" in result.console
    mounts, listed, _ = parse_report(result.console)
    by_target = {row[1]: row for row in mounts}
    assert by_target["/etc"][0] == by_target["/var"][0] == "/dev/mapper/pystate-encrypted"
    assert by_target["/home"][0] == "/dev/vda2"
    assert listed[KEY_FILE][:2] == ("400", "0:0")
    assert str(steps(result)["layout"]["detail"]).endswith("seeded /etc, /var")


def test_debian_resize_service_grows_the_image_under_systemd(
    initrd: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The payload and pystate-resized.service installed as README says, run by systemd with
    the unit's sandbox, on a root whose python3 is python3-minimal: /var filled inside the
    image on the first boot, the service grows it before the writer sees ENOSPC."""
    from pystate_build.booted import FILL_WORD, install_fill_demo, install_pystate, parse_grow
    from pystate_build.initrd import build_payload
    from pystate_build.roots import DEBIAN_MARKER, build_debian_root

    tmp = tmp_path_factory.mktemp("debian-resized")
    root = build_debian_root(tmp / "root")
    install_pystate(root, build_payload(tmp / "payload"))
    install_fill_demo(root)
    (tmp / "state").mkdir()
    layout = build_disk(tmp / "disk.img", root, tmp / "state", state_size=STATE_SIZE)
    m = Machine("debian-resized", layout, initrd, tmp)
    result = m.boot(FILL_WORD, expect=(DEBIAN_MARKER,))
    assert result.ok, harness.describe(result)
    grow = parse_grow(result.console)
    assert grow is not None, harness.describe(result)
    assert grow.service == "active" and not grow.enospc, grow
    assert grow.image_after > grow.image_before and grow.fs_after > grow.fs_before, grow
    grows = [line for line in grow.log if " in " in line and line.startswith("pystate: grow ")]
    assert grows, grow.log  # "pystate: grow 342 MiB -> 449 MiB in 1.62 s (allocate …)"
    assert "I/O error" not in result.console
    # the service read the configuration the initrd published (here: built-in defaults)
    assert "weights 50:50" in grow.log[0], grow.log
    # `pystate status` in the booted system: the boot, the image, the TPM, the policy's view
    status = "\n".join(grow.status)
    assert status.startswith("boot: ok in "), status
    assert "created at this boot" in status  # a first boot: provisioned, not unlocked
    assert "TPM2: keyslot 0, PCRs sha256:7+15 (15 = zero, measured)" in status
    # the check users ask peers for before rebooting, from the token's sealed PCR values
    assert "PCR 7 unchanged since sealing: the TPM will unseal at the next boot" in status, status
    assert "resize: last change grow " in status, status
    assert "mount: encrypted var" in status and "NOT MOUNTED" not in status, status


def test_shell_initrd_provisions_then_unlocks(tmp_path_factory: pytest.TempPathFactory) -> None:
    """dracut without systemd: the pre-pivot hook runs the same program."""
    work = tmp_path_factory.mktemp("initrd-shell")
    shell = build_initrd_in(work, work / "shell.img", systemd=False)
    m = _machine("shell", shell, tmp_path_factory.mktemp("machine-shell"))
    first = m.boot("testroot.list=/etc/hostname")
    assert first.ok, harness.describe(first)
    assert steps(first)["commit"]["ok"]
    second = m.boot("testroot.list=/etc/hostname")
    assert second.ok, harness.describe(second)
    s = steps(second)
    assert s["luks-open"]["ok"] and "recovery" not in s, s
    mounts, _, files = parse_report(second.console)
    assert {row[1]: row[0] for row in mounts}["/etc"] == "/dev/mapper/pystate-encrypted"
    assert files["/etc/hostname"] == "from-the-image"
