"""Encrypted state on the host, everything that needs no device-mapper.

Real cryptsetup on image files, real tpm2-tools against swtpm, real loop devices
(root), real cp on ext4 (xattrs, ACLs). `cryptsetup open` of a mapping is the one
thing the host cannot do; the QEMU tests (test_encrypted_qemu.py) cover it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import swtpm as swtpm_helper
from conftest import needs_root

from pystate_initrd.config import Config, load_config
from pystate_initrd.formats import dm_table, luks2, recovery
from pystate_initrd.formats.resize_policy import GIB, MIB, PolicyError, PolicyParams, initial_size
from pystate_initrd.formats.token import TokenError, decode_token, usable_token
from pystate_initrd.initrd import encrypted, provision, seed, unlock
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.secret import Secret, new_recovery_key
from pystate_initrd.system import askpass, block, luks, tpm2
from pystate_initrd.system.run import run
from pystate_initrd.volume import binding

swtpm = swtpm_helper.swtpm
tpm = swtpm_helper.tpm
needs_swtpm = swtpm_helper.needs_swtpm


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report() -> BootReport:
    return BootReport(Log(kmsg_path="/nonexistent"))


# --- initial size (pure) -------------------------------------------------------------------


HEADER = provision.HEADER_SIZE  # cryptsetup's default LUKS2 header, as provisioning uses


@pytest.mark.parametrize(
    ("outer_size", "outer_free", "expected"),
    [
        # roomy: the 1 GiB buffer plus the 16 MiB header
        (100 * GIB, 90 * GIB, GIB + 16 * MIB),
        # 1 GiB partition, ~1000 MiB free: room 744 MiB, half of it, plus the header
        (GIB, 1000 * MIB, 388 * MIB),
        # small: the 256 MiB minimum wins over the share
        (GIB, 700 * MIB, 256 * MIB),
        # just enough room above the reserve for the minimum
        (GIB, 512 * MIB, 256 * MIB),
    ],
)
def test_initial_size(outer_size: int, outer_free: int, expected: int) -> None:
    assert initial_size(outer_size, outer_free, HEADER, PolicyParams()) == expected


@pytest.mark.parametrize("outer_free", [0, 300 * MIB, 511 * MIB])
def test_initial_size_refuses_without_room(outer_free: int) -> None:
    with pytest.raises(PolicyError, match="needs 256 MiB above the reserve"):
        initial_size(GIB, outer_free, HEADER, PolicyParams())


def test_initial_size_follows_weights() -> None:
    params = PolicyParams(weights=(3, 1))  # plain gets three quarters
    assert initial_size(4 * GIB, 4 * GIB, HEADER, params) == 976 * MIB


# --- files ------------------------------------------------------------------------------


def test_allocate_full_and_sparse(tmp_path: Path) -> None:
    from pystate_initrd.config import Allocation

    full, sparse = tmp_path / "full", tmp_path / "sparse"
    provision.allocate(full, 64 * MIB, Allocation.FULL)
    provision.allocate(sparse, 64 * MIB, Allocation.SPARSE)
    assert full.stat().st_size == sparse.stat().st_size == 64 * MIB
    assert full.stat().st_blocks * 512 >= 64 * MIB
    assert sparse.stat().st_blocks == 0
    assert stat.S_IMODE(full.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        provision.allocate(full, MIB, Allocation.FULL)


@contextlib.contextmanager
def outer_fs(tmp_path: Path, fstype: str) -> Iterator[Path]:
    """A real outer file system of that type on a loop device, mounted; its mount point."""
    backing, mnt = tmp_path / f"{fstype}.fs", tmp_path / f"{fstype}-mnt"
    with backing.open("wb") as f:
        f.truncate(GIB)
    mkfs = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "ext4": ["mkfs.ext4", "-q", "-F"]}[fstype]
    subprocess.run([*mkfs, str(backing)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def lsattr(path: Path) -> str:
    """The attribute letters lsattr(1) shows for path (e.g. ``---------------C------``)."""
    out = subprocess.run(["lsattr", "-d", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


class _StopAfterLuksFormat(Exception):
    pass


@needs_root
@needs_swtpm
@pytest.mark.parametrize("fstype", ["btrfs", "ext4"])
def test_image_is_nocow_on_btrfs(tmp_path: Path, tpm: swtpm_helper.Swtpm, fstype: str) -> None:
    """SPEC §11.11: on a btrfs outer file system provisioning makes encrypted.img No_COW
    before its blocks are allocated (lsattr shows C); on ext4 the flag is neither set nor a
    failure. The real provision() runs up to luks-format (the host has no device-mapper for
    the mkfs step); commit's rename keeps the inode, so encrypted.img has it too."""

    def stop(step: str) -> None:
        if step == "luks-format":
            raise _StopAfterLuksFormat

    with outer_fs(tmp_path, fstype) as state:
        r = report()
        with pytest.raises(_StopAfterLuksFormat):
            provision.provision(Config(), state, tmp_path / "sysroot", r, tcti=tpm.tcti, hook=stop)
        new, final = state / "encrypted.img.new", state / "encrypted.img"
        assert luks.uuid(new)  # luks-formatted
        size = new.stat().st_size
        assert new.stat().st_blocks * 512 >= size  # fully allocated
        os.rename(new, final)  # as provision's commit step does
        allocate_step = next(s for s in r.steps if s.name == "allocate")
        if fstype == "btrfs":
            assert "C" in lsattr(final), lsattr(final)
            assert allocate_step.detail.endswith("(full, No_COW)")
            # A grow extends the same file: it stays No_COW, its new blocks allocated in place.
            fd = os.open(final, os.O_RDWR)
            try:
                block.fallocate(fd, 0, size, 16 * MIB)
            finally:
                os.close(fd)
            assert "C" in lsattr(final)
        else:
            assert "C" not in lsattr(final)
            assert allocate_step.detail.endswith("(full)")


@needs_root
def test_nocow_is_refused_on_a_file_with_data_on_btrfs(tmp_path: Path) -> None:
    with outer_fs(tmp_path, "btrfs") as state:
        path = state / "data"
        path.write_bytes(b"x" * 4096)
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(OSError, match="did not take the No_COW flag"):
                block.set_nocow(fd)
        finally:
            os.close(fd)


def test_leftover_new_image_is_removed(tmp_path: Path) -> None:
    assert provision.remove_leftover(tmp_path) is None
    (tmp_path / "encrypted.img.new").write_bytes(b"half")
    (tmp_path / "encrypted.img").write_bytes(b"whole")
    detail = provision.remove_leftover(tmp_path)
    assert detail == "deleted encrypted.img.new of an interrupted first boot"
    assert not (tmp_path / "encrypted.img.new").exists()
    assert (tmp_path / "encrypted.img").read_bytes() == b"whole"


def test_leftover_new_image_with_keyslots_is_crypto_erased(tmp_path: Path) -> None:
    """A provisioning cut after luks-format leaves keyslots: erased before the file goes."""
    new = tmp_path / "state/encrypted.img.new"
    new.parent.mkdir()
    new.write_bytes(bytes(20 * MIB))
    luks.format(new, key=b"k" * 32)
    kept = tmp_path / "kept.img"  # the same inode, outside /state
    os.link(new, kept)
    detail = provision.remove_leftover(new.parent)
    assert detail == "crypto-erased and deleted encrypted.img.new of an interrupted first boot"
    assert not new.exists()
    assert luks.keyslots(kept) == {}
    with pytest.raises(luks.NoKeyslot):
        luks.check_key(kept, key=b"k" * 32, key_slot=0)


def test_leftover_symlink_is_removed_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "encrypted.img.new").symlink_to(victim)
    assert provision.remove_leftover(tmp_path)
    assert victim.read_text() == "keep"


def test_recovery_key_file(tmp_path: Path) -> None:
    key = new_recovery_key()
    path = provision.write_recovery_key(tmp_path, key)
    assert path == tmp_path / ".pystate/recovery-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = path.read_text().splitlines()[0]
    assert recovery.normalize_recovery_key(first) == key
    with pytest.raises(FileExistsError):  # never overwritten
        provision.write_recovery_key(tmp_path, key)


# --- seeding: real cp on ext4 ---------------------------------------------------------------


def _attrs(path: Path) -> list[str]:
    acl = subprocess.run(
        ["getfacl", "-R", "-P", "--absolute-names", "."],
        cwd=path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    xattrs = subprocess.run(
        ["getfattr", "-R", "-P", "-d", "-m", "-", "--absolute-names", "."],
        cwd=path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            mtime = st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0
            rows.append(
                f"{p.relative_to(path)} {st.st_mode:o} {st.st_uid}:{st.st_gid} {st.st_nlink} "
                f"{mtime} {os.readlink(p) if p.is_symlink() else ''}"
            )
    return [*sorted(rows), acl, xattrs]


@needs_root
def test_seed_keeps_owners_modes_times_links_xattrs_acls(tmp_path: Path) -> None:
    src, dest = tmp_path / "etc", tmp_path / "entry"
    (src / "ssh").mkdir(parents=True)
    (src / "ssh/sshd_config").write_text("Port 22\n")
    (src / "shadow").write_text("root:*:1::::::\n")
    os.chmod(src / "shadow", 0o640)
    os.chown(src / "shadow", 0, 42)
    os.chown(src / "ssh", 1000, 1000)
    os.link(src / "ssh/sshd_config", src / "hardlink")
    (src / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "shadow", "user.note", b"secret stuff")
    capability = bytes.fromhex("0100000200200000" + "00" * 12)  # cap_net_raw+ep
    os.setxattr(src / "ssh/sshd_config", "security.capability", capability)
    subprocess.run(["setfacl", "-m", "u:1234:r", str(src / "shadow")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:50:rx", str(src / "ssh")], check=True)
    os.utime(src / "shadow", ns=(1_000_000_000_123, 1_000_000_000_123))
    os.chmod(src, 0o751)
    dest.mkdir()
    assert seed.seed(src, dest) is True
    assert _attrs(dest) == _attrs(src)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o751  # the entry takes the source's own mode
    assert (dest / "hardlink").stat().st_ino == (dest / "ssh/sshd_config").stat().st_ino


def test_seed_of_nothing_and_of_a_symlink(tmp_path: Path) -> None:
    dest = tmp_path / "entry"
    dest.mkdir()
    assert seed.seed(tmp_path / "missing", dest) is False
    (tmp_path / "link").symlink_to(tmp_path)
    assert seed.seed(tmp_path / "link", dest) is False
    assert not any(dest.iterdir())


def test_seed_refuses_a_non_empty_entry(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest/x").write_text("")
    with pytest.raises(seed.SeedError, match="not empty"):
        seed.seed(tmp_path / "src", tmp_path / "dest")


@needs_root
def test_layout_seeds_encrypted_entries_and_makes_plain_ones(tmp_path: Path) -> None:
    sysroot, inner, state = tmp_path / "sysroot", tmp_path / "inner", tmp_path / "state"
    (sysroot / "etc").mkdir(parents=True)
    (sysroot / "etc/hostname").write_text("box\n")
    (sysroot / "var/lib").mkdir(parents=True)
    (sysroot / "home").mkdir()
    inner.mkdir()
    state.mkdir()
    (state / "home").mkdir()
    (state / "home/alice").mkdir()
    done = provision.make_layout(Config(), inner, state, sysroot)
    assert done == [("encrypted", "/etc", True), ("encrypted", "/var", True)]
    assert (inner / "etc/hostname").read_text() == "box\n"
    assert (inner / "var/lib").is_dir()
    assert (state / "home/alice").is_dir()  # a plain entry is never touched


# --- LUKS2 with a real TPM seal --------------------------------------------------------------


@pytest.fixture
def formatted(tmp_path: Path, tpm: swtpm_helper.Swtpm) -> tuple[Path, bytes, str, str]:
    """A provisioned-style image file: (path, secret, recovery key, tcti)."""
    image = tmp_path / "encrypted.img.new"
    provision.allocate(image, 32 * MIB, Config().allocation)
    secret, vk = Secret.random(32), Secret.random(64)
    key_text = new_recovery_key()
    recovery_pass = Secret(recovery.recovery_passphrase(key_text))
    sealed = tpm2.seal(secret.value, pcrs=(7,), bank="sha256", pcr15_zero=True, tcti=tpm.tcti)
    provision.format_image(
        image,
        secret=secret.value,
        volume_key=vk.value,
        recovery_pass=recovery_pass.value,
        sealed=sealed,
    )
    return image, bytes(secret.value), key_text, tpm.tcti


@needs_swtpm
def test_format_keyslots_and_token(formatted: tuple[Path, bytes, str, str]) -> None:
    image, secret, key_text, tcti = formatted
    slots = luks.keyslots(image)
    assert sorted(slots) == [0, 1]
    for info in slots.values():
        assert (info.pbkdf, info.hash, info.iterations) == ("pbkdf2", "sha256", 1000)
        assert info.key_bits == 512
    header = luks.read_header(image)
    assert header.metadata["segments"]["0"]["encryption"] == "aes-xts-plain64"
    assert header.metadata["segments"]["0"]["sector_size"] == 4096
    exported = json.loads(luks.token_export(image, 0))
    assert exported["type"] == "pystate-tpm2"
    sealed, slot = decode_token(exported)
    assert slot == 0 and sealed.pcrs == (7, 15) and sealed.pcr15_zero
    luks.check_key(image, key=secret, key_slot=0)
    luks.check_key(image, key=recovery.recovery_passphrase(key_text), key_slot=1)
    with pytest.raises(luks.BadKey):
        luks.check_key(image, key=secret, key_slot=1)
    # What the initrd does: token from the header, unsealed by the TPM, opens slot 0.
    token_id, sealed2, slot2 = usable_token(luks.tokens(image))
    assert (token_id, slot2) == (0, 0)
    assert tpm2.unseal(sealed2, tcti=tcti) == secret


@needs_swtpm
def test_unseal_refused_once_pcr15_is_extended(formatted: tuple[Path, bytes, str, str]) -> None:
    image, _, _, tcti = formatted
    _, sealed, _ = usable_token(luks.tokens(image))
    binding.extend_pcr15(os.urandom(64), luks.uuid(image), "sha256", tcti)
    with pytest.raises(tpm2.PcrMismatch):
        tpm2.unseal(sealed, tcti=tcti)


def test_damaged_header_copy_is_refused_and_left_alone(tmp_path: Path) -> None:
    image = tmp_path / "encrypted.img"
    image.write_bytes(bytes(8 * MIB))
    luks.format(image, key=b"k" * 32)
    with open(image, "r+b") as f:  # one byte of the primary JSON area
        f.seek(4096 + 10)
        f.write(b"\xff")
    before = digest(image)
    with pytest.raises(unlock.UnlockError, match="primary copy of the LUKS2 header .* damaged"):
        unlock.check_header(image)
    with open(image, "r+b") as f:
        f.write(b"\0" * 16384)  # both gone: not LUKS at all any more
        f.seek(16384)
        f.write(b"\0" * 16384)
    with pytest.raises(unlock.UnlockError, match="not a LUKS2 image"):
        unlock.check_header(image)
    assert before != digest(image)  # (the test itself changed it; pystate never does)


@pytest.mark.parametrize(
    "token",
    [
        {"type": "pystate-tpm2", "keyslots": ["0"]},
        {"type": "pystate-tpm2", "keyslots": "0", "version": 1},
        {"type": "systemd-tpm2", "keyslots": ["0"]},
    ],
)
def test_hostile_or_foreign_tokens_are_not_used(token: dict[str, object]) -> None:
    header = luks2.Luks2Header(
        uuid="x",
        label="",
        subsystem="",
        seqid=1,
        header_size=16384,
        metadata={
            "keyslots": {},
            "tokens": {"0": token},
            "segments": {},
            "digests": {},
            "config": {},
        },
        primary_ok=True,
        secondary_ok=True,
    )
    with pytest.raises(TokenError):
        usable_token(luks2.token_dicts(header.metadata))


# --- unlock failures on a real image, no device-mapper needed -------------------------------


@needs_root
@needs_swtpm
def test_no_tpm_three_wrong_recovery_keys_stop_and_change_nothing(
    formatted: tuple[Path, bytes, str, str], tmp_path: Path
) -> None:
    image, _, key_text, _ = formatted
    final = image.with_name("encrypted.img")
    image.rename(final)
    before = digest(final)
    asked: list[str] = []

    # Typos, so no cryptsetup open is tried: on the host it would fail for want of
    # device-mapper before checking the key. Wrong but well-formed keys: QEMU test.
    def ask(prompt: str, attempt: int) -> bytearray:
        asked.append(prompt)
        return bytearray(key_text[:-1] + "x" if attempt < 3 else "not-a-key", "ascii")

    r = report()
    with pytest.raises(unlock.UnlockError, match="no valid recovery key was given"):
        unlock.unlock(
            Config(), final, tmp_path / "mnt", r, ask=ask, tcti="device:/dev/nonexistent-tpm"
        )
    assert len(asked) == 3 and "try 3 of 3" in asked[-1]
    assert digest(final) == before
    steps = {s.name: s for s in r.steps}
    assert "no TPM2" in steps["unseal"].detail
    assert not steps["recovery"].ok
    # The loop device was released again.
    loops = subprocess.run(["losetup", "-l"], capture_output=True, text=True, check=True).stdout
    assert str(final) not in loops


def test_first_boot_without_tpm_stops_and_creates_nothing(tmp_path: Path) -> None:
    """SPEC §11.1: by default a first boot without a TPM stops before anything is made."""
    (tmp_path / "home").mkdir()
    (tmp_path / "encrypted.img.new").write_bytes(b"interrupted")
    r = report()
    with pytest.raises(encrypted.NoTpmAtFirstBoot) as stop:
        encrypted.setup(
            Config(), tmp_path, tmp_path / "sysroot", r, "quiet", tcti="device:/dev/nonexistent-tpm"
        )
    message = str(stop.value)
    assert message.startswith("no TPM2 on this machine: the first boot cannot create ")
    assert "/etc, /var would stay on the read-only image" in message
    assert "[tpm2] required = no" in message
    # The leftover of an interrupted first boot is still deleted; nothing is created.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert [s.name for s in r.steps] == ["discard-leftover"]
    assert "encrypted" not in r.facts


def test_no_tpm_stop_names_the_encrypted_targets(tmp_path: Path) -> None:
    image = tmp_path / "encrypted.img"
    assert "(/etc, /var would stay" in str(encrypted.no_tpm_at_first_boot(Config(), image))
    plain_only = Config(layout=tuple(e for e in Config().layout if e.area == "plain"))
    message = str(encrypted.no_tpm_at_first_boot(plain_only, image))
    assert message.startswith(f"no TPM2 on this machine: the first boot cannot create {image};")


def test_first_boot_without_tpm_required_no_goes_on_with_plain_entries(tmp_path: Path) -> None:
    (tmp_path / "encrypted.img.new").write_bytes(b"interrupted")
    r = report()
    result = encrypted.setup(
        Config(tpm2_required=False),
        tmp_path,
        tmp_path / "sysroot",
        r,
        "quiet",
        tcti="device:/dev/nonexistent-tpm",
    )
    assert result is None
    assert r.facts["encrypted"] == {"state": "not provisioned: no TPM2"}
    assert not (tmp_path / "encrypted.img.new").exists()
    assert [s.name for s in r.steps] == ["discard-leftover"]


def test_setup_refuses_an_image_that_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "encrypted.img").mkdir()
    with pytest.raises(encrypted.EncryptedError, match="not a regular file"):
        encrypted.setup(Config(), tmp_path, tmp_path, report(), "", tcti="device:/dev/none")


def test_config_layout_default_is_what_provisioning_makes() -> None:
    cfg = load_config(None, "")
    assert [(str(e.area), e.target, e.seed) for e in cfg.layout] == [
        ("encrypted", "/etc", True),
        ("plain", "/home", False),
        ("encrypted", "/var", True),
    ]


# --- asking for the key ---------------------------------------------------------------------


def test_console_prompt_reads_one_line_with_echo_off() -> None:
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    result: list[bytearray | None] = []
    thread = threading.Thread(target=lambda: result.append(askpass.ask_console("Key:", name)))
    thread.start()
    seen = b""
    while b"Key:" not in seen:
        seen += os.read(master, 1024)
    os.write(master, b"cbdefghi-jklnrtuv\nnext line\n")
    thread.join(5)
    os.close(slave)
    os.close(master)
    assert result == [bytearray(b"cbdefghi-jklnrtuv")]


def test_ask_password_argv() -> None:
    argv = askpass.ask_argv("Recovery key:")
    assert argv[0] == "systemd-ask-password" and argv[-1] == "Recovery key:"
    assert "--timeout=0" in argv and "--no-tty" in argv


# --- the runner's secret helpers -------------------------------------------------------------


def test_run_secret_output_and_input() -> None:
    out = run(["cat"], input=bytearray(b"key\n"), secret_output=True)
    assert out.secret == bytearray(b"key\n") and out.stdout == b""
    r, w = os.pipe()
    os.write(w, b"via fd")
    os.close(w)
    try:
        assert run(["cat", f"/dev/fd/{r}"], pass_fds=[r]).stdout == b"via fd"
    finally:
        os.close(r)


# --- pystate status ---------------------------------------------------------------------------


@needs_swtpm
def test_status_reads_boot_json_and_live_facts(
    formatted: tuple[Path, bytes, str, str], tmp_path: Path
) -> None:
    from pystate_initrd.booted import status

    image, _, _, _ = formatted
    root = tmp_path / "root"
    (root / "state/encrypted").mkdir(parents=True)
    shutil.move(image, root / "state/encrypted.img")
    (root / "home").mkdir()
    boot = {
        "outcome": "ok",
        "error": None,
        "total_ms": 5000.0,
        "partition": {"device": "/dev/vda2", "part_uuid": "u", "reason": "root disk"},
        "state": {"mountpoint": "/sysroot/state", "fstype": "ext4"},
        "encrypted": {"unlocked_by": "tpm2"},
        "steps": [{"name": "unseal", "ms": 700.0, "ok": True, "detail": ""}],
        "mounts": [{"area": "plain", "name": "home", "target": "/home"}],
        "rejected": [],
    }
    (tmp_path / "boot.json").write_text(json.dumps(boot))
    info = status.collect(tmp_path / "boot.json", root)
    assert info["outer"]["size"] > 0 and info["outer"]["fstype"] == "ext4"
    enc = info["encrypted"]
    assert enc["image"]["size"] == 32 * MIB
    assert enc["luks"]["tpm2"]["pcrs"] == [7, 15] and enc["luks"]["header_ok"]
    assert enc["luks"]["keyslots"]["0"]["role"] == "tpm2"
    assert enc["luks"]["keyslots"]["1"]["role"] == "recovery"
    assert info["mounts"] == [
        {"area": "plain", "name": "home", "target": "/home", "mounted": False}
    ]
    text = status.render(info)
    assert "TPM2: keyslot 0, PCRs sha256:7+15 (15 = zero, measured)" in text
    assert "(NOT MOUNTED)" in text and "unseal 700.0" in text
    assert ", unlocked by tpm2" in text
    info["encrypted"]["boot"]["unlocked_by"] = "provisioned"
    assert ", created at this boot" in status.render(info)


def test_status_without_boot_json(tmp_path: Path) -> None:
    from pystate_initrd.booted import status

    info = status.collect(tmp_path / "missing.json", tmp_path)
    assert "cannot read" in info["error"]
    assert status.render(info).startswith("pystate: cannot read")


def _dm_reply(params: bytes, target: bytes = b"crypt", count: int = 1) -> bytearray:
    import struct

    buf = dm_table.dm_table_request("pystate-encrypted")
    struct.pack_into("=I", buf, 20, count)
    spec = struct.pack("=QQiI16s", 0, 2048, 0, 0, target)
    buf[312 : 312 + len(spec)] = spec
    buf[352 : 352 + len(params) + 1] = params + b"\0"
    return buf


def test_dm_table_request_layout() -> None:
    import struct

    buf = dm_table.dm_table_request("pystate-encrypted")
    assert struct.unpack_from("=3IIII", buf, 0) == (4, 0, 0, 16384, 312, 0)
    assert buf[48:65] == b"pystate-encrypted" and buf[65] == 0


@pytest.mark.parametrize(
    ("params", "target", "expected"),
    [
        (b"aes-xts-plain64 " + b"ab" * 64 + b" 0 7:0 32768 1 sector_size:4096", b"crypt",
         bytes([0xAB]) * 64),
        (b"aes-xts-plain64 :64:logon:cryptsetup:x 0 7:0 32768", b"crypt", None),
        (b"aes-xts-plain64 " + b"zz" * 32 + b" 0 7:0 0", b"crypt", None),
        (b"whatever", b"linear", None),
    ],
)  # fmt: skip
def test_dm_table_key(params: bytes, target: bytes, expected: bytes | None) -> None:
    buf = _dm_reply(params, target)
    if expected is None:
        with pytest.raises(dm_table.DmTableError):
            dm_table.dm_table_key(buf)
    else:
        assert dm_table.dm_table_key(buf) == expected
