"""The offline ext4 shrink made crash-safe with resize2fs's undo file (issue 14 point 2).

Real e2fsprogs on real ext4 on loop devices (root): resize2fs -z then e2undo gives the file
system back byte for byte; resize2fs SIGKILLed at seeded random instants, then pystate's
boot-side recovery, gives back a clean file system with every file intact; an undo file of
another file system is refused. The boot's decision as a table; the undo header parser and
the progress parser against hostile bytes (hypothesis).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import PlainUndoDir, needs_root
from hypothesis import given, settings
from hypothesis import strategies as st

from pystate_initrd.config import Config
from pystate_initrd.formats import e2undo, shrink_progress, shrink_scratch
from pystate_initrd.formats.shrink_progress import (
    Action,
    Progress,
    Step,
    Undo,
    decide,
    parse_progress,
)
from pystate_initrd.formats.shrink_request import RequestError, ShrinkRequest
from pystate_initrd.initrd import offline_shrink
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.system import loopdev, mount_api
from pystate_initrd.volume import request_file, undo_file

MIB = 1 << 20
FS_UUID = "80271dfa-206a-40b0-af92-32fd4c62e288"
LUKS = "0b0e7ab4-8a3c-4b8e-9d5a-3f0b7c9e1a2d"
NONCE = "5a" * 32


def quiet_report() -> BootReport:
    return BootReport(Log(kmsg_path="/nonexistent"))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


# --- (c) the boot's decision, as a table ---------------------------------------------------


def progress(step: Step, attempt: int = 1) -> Progress:
    return Progress(LUKS, FS_UUID, 512 * MIB, 300 * MIB, step, attempt, NONCE)


R, D, G, S = Step.RESIZE2FS, Step.RESIZED, Step.GIVEN_UP, Step.SCRATCH
ALL_UNDO = list(Undo)


@pytest.mark.parametrize(
    ("prog", "undo", "action", "roll_back"),
    [
        # no progress file: an undo file alone is never applied
        (None, Undo.ABSENT, Action.NOTHING, False),
        *[(None, u, Action.CLEAN_UP, False) for u in ALL_UNDO if u is not Undo.ABSENT],
        # an invalid progress file: undo data is not applied without it
        ("shrink progress is not ASCII JSON", Undo.ABSENT, Action.CLEAN_UP, False),
        ("shrink progress is not ASCII JSON", Undo.EMPTY, Action.CLEAN_UP, False),
        ("shrink progress is not ASCII JSON", Undo.VALID, Action.FSCK_ONLY, False),
        ("shrink progress is not ASCII JSON", Undo.DAMAGED, Action.FSCK_ONLY, False),
        ("shrink progress is not ASCII JSON", Undo.FOREIGN, Action.FSCK_ONLY, False),
        # cut off while the undo area was made: resize2fs never ran, whatever the area holds
        *[(progress(S), u, Action.CLEAN_UP, False) for u in ALL_UNDO],
        *[(progress(S, 2), u, Action.GIVE_UP, False) for u in ALL_UNDO],
        # cut off before/during resize2fs, first attempt: roll back and try again
        (progress(R), Undo.ABSENT, Action.CLEAN_UP, False),
        (progress(R), Undo.EMPTY, Action.CLEAN_UP, False),
        (progress(R), Undo.VALID, Action.ROLL_BACK, True),
        # ... and the undo area unusable (does not open, tampered, damaged): a clear stop
        (progress(R), Undo.DAMAGED, Action.STOP, False),
        (progress(R), Undo.FOREIGN, Action.STOP, False),
        # ... second attempt: roll back, then give up
        (progress(R, 2), Undo.ABSENT, Action.GIVE_UP, False),
        (progress(R, 2), Undo.EMPTY, Action.GIVE_UP, False),
        (progress(R, 2), Undo.VALID, Action.GIVE_UP, True),
        (progress(R, 2), Undo.DAMAGED, Action.STOP, False),
        (progress(R, 2), Undo.FOREIGN, Action.STOP, False),
        # resize2fs had finished: go on (the undo file is not needed, whatever it is)
        *[(progress(D), u, Action.CONTINUE, False) for u in ALL_UNDO],
        *[(progress(D, 2), u, Action.GIVE_UP, False) for u in ALL_UNDO],
        # given up before: stays given up
        *[(progress(G, 2), u, Action.GIVE_UP, False) for u in ALL_UNDO],
    ],
)
def test_decide_one(
    prog: Progress | str | None, undo: Undo, action: Action, roll_back: bool
) -> None:
    d = decide(prog, undo)
    assert (d.action, d.roll_back) == (action, roll_back), d
    assert d.why


def test_decide_never_rolls_back_without_a_valid_undo_file() -> None:
    for prog in [None, "bad", *(progress(s, a) for s in Step for a in (1, 2))]:
        for undo in Undo:
            d = decide(prog, undo)
            assert not d.roll_back or undo is Undo.VALID


# --- parsers: the progress file and the undo header -----------------------------------------


def test_progress_round_trip() -> None:
    import json

    for step in Step:
        p = progress(step, 2)
        assert parse_progress(json.dumps(p.to_json()).encode()) == p


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"version": 1}',
        b"\xff",
        b" " * 5000,
        b'{"version":1,"luks_uuid":"","fs_uuid":"","current":1,"size":1,"step":"resized","attempt":1}',
        b'{"version":1,"luks_uuid":"","fs_uuid":"x","current":1,"size":1,"step":"resized","attempt":1}',
        b'{"version":1,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":1,"size":1,"step":"resized","attempt":3}',
        b'{"version":1,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":true,"size":1,"step":"resized","attempt":1}',
        b'{"version":1,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":1,"size":1,"step":"done","attempt":1}',
        # version 2: the nonce, 64 lowercase hex digits
        b'{"version":2,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":1,"size":1,"step":"resized","attempt":1}',
        b'{"version":2,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":1,"size":1,"step":"resized","attempt":1,"nonce":"00"}',
        b'{"version":2,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":1,"size":1,"step":"resized","attempt":1,"nonce":"' + b"A" * 64 + b'"}',
        b'{"version":2,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":1,"size":1,"step":"resized","attempt":1,"nonce":7}',
        # a version 1 file (a plaintext undo file on /state) is not taken
        b'{"version":1,"luks_uuid":"","fs_uuid":"80271dfa-206a-40b0-af92-32fd4c62e288",'
        b'"current":1,"size":1,"step":"resized","attempt":1,"nonce":"' + b"a" * 64 + b'"}',
    ],
)
def test_progress_refused(data: bytes) -> None:
    with pytest.raises(RequestError):
        parse_progress(data)


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_progress_parser_raises_only_request_error(data: bytes) -> None:
    with contextlib.suppress(RequestError):
        parse_progress(data)


@given(st.binary(min_size=0, max_size=1200))
@settings(max_examples=300, deadline=None)
def test_undo_header_parser_raises_only_its_error(data: bytes) -> None:
    try:
        parse = e2undo.parse_header(data)
        assert parse.block_size >= e2undo.MIN_BLOCK
    except e2undo.UndoFileError:
        pass
    with contextlib.suppress(e2undo.UndoFileError):
        e2undo.saved_fs_uuid(data)


@given(st.binary(min_size=512, max_size=512), st.integers(0, 511))
@settings(max_examples=200, deadline=None)
def test_undo_header_flipped_byte_is_refused(data: bytes, at: int) -> None:
    # Any header with E2UNDO02 whose checksum does not cover it is refused.
    head = bytearray(e2undo.MAGIC + data[8:])
    crc = e2undo.crc32c_le(0xFFFFFFFF, bytes(head[:508]))
    head[508:] = (crc ^ 1).to_bytes(4, "little")
    with pytest.raises(e2undo.UndoFileError):
        e2undo.parse_header(bytes(head))


def test_crc32c_known_value() -> None:
    # RFC 3720's check value: crc32c("123456789") = 0xe3069283 (with the final inversion).
    assert e2undo.crc32c_le(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283


# --- the undo area's key and size (pure) ------------------------------------------------------


@given(st.binary(min_size=16, max_size=128), st.binary(min_size=32, max_size=32))
@settings(max_examples=200, deadline=None)
def test_scratch_key_is_hmac_sha512(volume_key: bytes, nonce: bytes) -> None:
    import hmac

    want = hmac.new(volume_key, b"pystate shrink undo" + nonce, "sha512").digest()
    key = shrink_scratch.derive_key(bytearray(volume_key), nonce)
    assert isinstance(key, bytearray) and bytes(key) == want
    assert len(key) == shrink_scratch.KEY_BYTES


def test_scratch_key_depends_on_key_and_nonce() -> None:
    vk = bytearray(range(64))
    a = shrink_scratch.derive_key(vk, bytes(32))
    assert a != shrink_scratch.derive_key(vk, bytes(31) + b"\x01")
    assert a != shrink_scratch.derive_key(bytearray(range(1, 65)), bytes(32))
    assert vk == bytearray(range(64))  # the caller's key is not touched
    for bad_key, bad_nonce in [(bytearray(8), bytes(32)), (vk, bytes(16)), (vk, b"")]:
        with pytest.raises(ValueError):
            shrink_scratch.derive_key(bad_key, bad_nonce)


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 40), st.integers(1, 1 << 40))
def test_scratch_size_covers_the_worst_case(used: int, fs_now: int, fs_new: int) -> None:
    bound = shrink_scratch.undo_bound(used, fs_now, fs_new)
    assert bound >= min(used, max(fs_now - fs_new, 0)) + fs_new // 64
    size = shrink_scratch.scratch_size(used, fs_now, fs_new)
    assert size % MIB == 0 and size >= bound + shrink_scratch.OVERHEAD


def test_scratch_commands_keep_the_key_off_argv() -> None:
    argv = shrink_scratch.open_argv("/dev/loop7", "pystate-shrink-undo")
    assert "--key-file=-" in argv and argv[-2:] == ["/dev/loop7", "pystate-shrink-undo"]
    assert argv[argv.index("--cipher") + 1] == "aes-xts-plain64"
    assert argv[argv.index("--key-size") + 1] == "512"
    assert argv[argv.index("--hash") + 1] == "plain"  # the key as given, not hashed
    mkfs = shrink_scratch.mkfs_argv("/dev/mapper/x")
    assert "nodiscard" in mkfs[mkfs.index("-E") + 1]  # the sparse file stays sparse


# --- real e2fsprogs on loop devices ----------------------------------------------------------


def make_fs(path: Path, size: int, files: int, seed: int) -> tuple[str, dict[str, str]]:
    """A loop device over a new ext4 image holding random files, half of them deleted again
    (so a shrink moves blocks); the surviving files' sha256."""
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(path)], check=True)
    loop = loopdev.loop_attach(str(path), direct_io=False).path
    mnt = path.parent / "mnt"
    mnt.mkdir(exist_ok=True)
    mount_api.mount(loop, str(mnt), "ext4", 0, None)
    rng = random.Random(seed)
    sums = {}
    try:
        for i in range(files):
            data = rng.randbytes(rng.choice([4096, 100_000, MIB]))
            (mnt / f"f{i}").write_bytes(data)
            sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
        for i in range(0, files, 2):
            (mnt / f"f{i}").unlink()
            del sums[f"f{i}"]
    finally:
        mount_api.umount2(str(mnt))
    assert run("e2fsck", "-f", "-p", loop).returncode == 0
    return loop, sums


def file_sums(loop: str, mnt: Path) -> dict[str, str]:
    mnt.mkdir(exist_ok=True)
    mount_api.mount(loop, str(mnt), "ext4", mount_api.MS_RDONLY, None)
    try:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in mnt.iterdir()
            if p.name.startswith("f")
        }
    finally:
        mount_api.umount2(str(mnt))


@needs_root
def test_resize2fs_z_then_e2undo_restores_byte_for_byte(tmp_path: Path) -> None:
    # (a)
    loop, _ = make_fs(tmp_path / "fs.img", 512 * MIB, 300, seed=1)
    try:
        before = Path(loop).read_bytes()
        undo = tmp_path / "u.e2undo"
        assert run("resize2fs", "-z", str(undo), loop, "120M").returncode == 0
        assert Path(loop).read_bytes() != before
        header = e2undo.parse_header(undo.read_bytes()[:512])
        assert header.finished and header.num_keys > 0
        assert run("e2undo", str(undo), loop).returncode == 0
        assert Path(loop).read_bytes() == before
        assert run("e2fsck", "-f", "-n", loop).returncode == 0
    finally:
        loopdev.loop_detach(loop)


@needs_root
def test_undo_file_of_another_fs_is_refused(tmp_path: Path) -> None:
    # (d) pystate's guard (the saved superblock's UUID) and e2undo's own (the whole
    # superblock) both refuse; the other file system is left as it was.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    loop_a, _ = make_fs(tmp_path / "a/fs.img", 256 * MIB, 60, seed=2)
    loop_b, _ = make_fs(tmp_path / "b/fs.img", 256 * MIB, 60, seed=3)
    area = tmp_path / "area"
    area.mkdir()
    undo = undo_file.path(area)
    try:
        assert run("resize2fs", "-z", str(undo), loop_a, "150M").returncode == 0
        uuid_b = uuid.UUID(run("blkid", "-s", "UUID", "-o", "value", loop_b).stdout.strip())
        kind, why = undo_file.inspect(area, {uuid_b})
        assert kind is Undo.FOREIGN, why
        before = Path(loop_b).read_bytes()
        refused = run("e2undo", str(undo), loop_b)
        assert refused.returncode != 0 and "doesn't match" in refused.stdout
        assert Path(loop_b).read_bytes() == before
        # And a damaged one: a flipped byte in the header.
        raw = bytearray(undo.read_bytes())
        raw[20] ^= 0xFF
        undo.write_bytes(bytes(raw))
        uuid_a = uuid.UUID(run("blkid", "-s", "UUID", "-o", "value", loop_a).stdout.strip())
        kind, why = undo_file.inspect(area, {uuid_a})
        assert kind is Undo.DAMAGED and "checksum" in why, why
    finally:
        loopdev.loop_detach(loop_a)
        loopdev.loop_detach(loop_b)


@needs_root
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_resize2fs_killed_midway_is_rolled_back_at_boot(tmp_path: Path, seed: int) -> None:
    # (b) A real crash: pystate's own offline shrink with resize2fs SIGKILLed at a seeded
    # random instant (the process dies, its writes so far stay: what the kernel has), then
    # the next boot's recover_interrupted_shrink + the boot's e2fsck -p.
    state = tmp_path / "state"
    state.mkdir()
    loop, sums = make_fs(state / "encrypted.img", 768 * MIB, 500, seed=seed)
    mnt = tmp_path / "mnt"
    area = PlainUndoDir(tmp_path / "area")
    try:
        fs_uuid = run("blkid", "-s", "UUID", "-o", "value", loop).stdout.strip()
        # How long a whole shrink takes here, on a copy of the same file system.
        before = Path(loop).read_bytes()
        t0 = time.monotonic()
        assert run("resize2fs", "-z", str(tmp_path / "t.e2undo"), loop, "200M").returncode == 0
        whole = time.monotonic() - t0
        assert run("e2undo", str(tmp_path / "t.e2undo"), loop).returncode == 0
        assert Path(loop).read_bytes() == before
        rng = random.Random(seed)
        for _ in range(3):
            at = rng.uniform(0.05, 0.9) * whole
            req = ShrinkRequest(LUKS, 768 * MIB, 200 * MIB, 200 * MIB)
            request_file.write_request(state, req)
            request_file.write_progress(
                state,
                Progress(req.luks_uuid, fs_uuid, req.current, req.size, Step.RESIZE2FS, 1, NONCE),
            )
            fd = undo_file.create(area.make(bytes.fromhex(NONCE), 0))
            proc = subprocess.Popen(
                ["resize2fs", "-z", f"/proc/self/fd/{fd}", loop, "200M"],
                pass_fds=[fd],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            os.close(fd)
            time.sleep(at)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            detail = offline_shrink.recover_interrupted_shrink(
                state, loop, quiet_report(), undo_area=area
            )
            assert detail is not None
            assert "rolled back with e2undo" in detail or "finished" in detail, detail
            assert not area.exists()
            assert run("e2fsck", "-p", loop).returncode in (0, 1)  # the boot's inner-fsck
            assert run("e2fsck", "-f", "-n", loop).returncode == 0
            if "rolled back" in detail:
                assert file_sums(loop, mnt) == sums
                assert run("blockdev", "--getsize64", loop).stdout.strip() == str(768 * MIB)
            else:  # SIGKILL landed after resize2fs had completed: the request goes on
                assert file_sums(loop, mnt) == sums
                break
            request_file.remove_request(state)
            request_file.remove_progress(state)
    finally:
        loopdev.loop_detach(loop)


@needs_root
def test_recovery_then_the_retry_completes_and_cleans_up(tmp_path: Path) -> None:
    # The whole path: a cut-off shrink rolled back at boot, then apply_pending_shrink tries
    # again (attempt 2) and completes; no undo or progress file is left.
    state = tmp_path / "state"
    state.mkdir()
    loop, sums = make_fs(state / "encrypted.img", 512 * MIB, 200, seed=5)
    area = PlainUndoDir(tmp_path / "area")
    try:
        fs_uuid = run("blkid", "-s", "UUID", "-o", "value", loop).stdout.strip()
        req = ShrinkRequest(LUKS, 512 * MIB, 300 * MIB, 300 * MIB)
        request_file.write_request(state, req)
        request_file.write_progress(
            state, Progress(LUKS, fs_uuid, req.current, req.size, Step.RESIZE2FS, 1, NONCE)
        )
        fd = undo_file.create(area.make(bytes.fromhex(NONCE), 0))
        proc = subprocess.run(
            ["resize2fs", "-z", f"/proc/self/fd/{fd}", loop, "300M"], pass_fds=[fd], check=False
        )
        os.close(fd)
        assert proc.returncode == 0
        # Cut "during" resize2fs as far as the progress file knows: roll back.
        detail = offline_shrink.recover_interrupted_shrink(
            state, loop, quiet_report(), undo_area=area
        )
        assert detail is not None and "rolled back" in detail, detail
        assert run("e2fsck", "-p", loop).returncode in (0, 1)
        prog = request_file.read_progress(state)
        assert isinstance(prog, Progress) and prog.attempt == 1
        detail = offline_shrink.apply_pending_shrink(
            Config(), state, loop, quiet_report(), crypt_name=None, cmdline="", undo_area=area
        )
        assert detail is not None and "-> 300 MiB" in detail, detail
        assert len(area.made) == 2 and area.made[0] != area.made[1]  # a fresh nonce each time
        assert os.stat(state / "encrypted.img").st_size == 300 * MIB
        assert sorted(os.listdir(state / ".pystate")) == []
    finally:
        loopdev.loop_detach(loop)


@needs_root
def test_second_cut_gives_up_and_is_not_asked_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    loop, _ = make_fs(state / "encrypted.img", 512 * MIB, 20, seed=6)
    area = PlainUndoDir(tmp_path / "area")
    try:
        fs_uuid = run("blkid", "-s", "UUID", "-o", "value", loop).stdout.strip()
        req = ShrinkRequest(LUKS, 512 * MIB, 300 * MIB, 300 * MIB)
        request_file.write_request(state, req)
        request_file.write_progress(
            state, Progress(LUKS, fs_uuid, req.current, req.size, Step.RESIZE2FS, 2, NONCE)
        )
        detail = offline_shrink.recover_interrupted_shrink(
            state, loop, quiet_report(), undo_area=area
        )
        assert detail is not None and "given up" in detail, detail
        assert request_file.read_request(state) is None
        # The service asks again for the same image size: refused at once, with the reason.
        request_file.write_request(state, req)
        detail = offline_shrink.apply_pending_shrink(
            Config(), state, loop, quiet_report(), crypt_name=None, cmdline="", undo_area=area
        )
        assert detail is not None and "given up" in detail, detail
        assert os.stat(state / "encrypted.img").st_size == 512 * MIB
        assert shrink_progress.MAX_ATTEMPTS == 2
    finally:
        loopdev.loop_detach(loop)


# --- what an attacker's writes to the encrypted area turn into -------------------------------
# A write to the area's ciphertext decrypts to random 16-byte units (aes-xts): the undo file
# then holds noise where the attacker wrote. These tests put noise there directly.


def _shrunk_with_undo(tmp_path: Path, seed: int) -> tuple[str, Path, bytes]:
    """A file system shrunk with resize2fs -z: its loop device, the undo file, its bytes now."""
    loop, _ = make_fs(tmp_path / "fs.img", 384 * MIB, 160, seed=seed)
    undo = tmp_path / "u.e2undo"
    assert run("resize2fs", "-z", str(undo), loop, "150M").returncode == 0
    return loop, undo, Path(loop).read_bytes()


@needs_root
@pytest.mark.parametrize("where", ["key-block", "data-block", "last-block", "superblock"])
def test_noise_in_the_undo_file_is_refused_and_writes_nothing(tmp_path: Path, where: str) -> None:
    loop, undo, after = _shrunk_with_undo(tmp_path, seed=21)
    try:
        raw = bytearray(undo.read_bytes())
        header = e2undo.parse_header(bytes(raw[:512]))
        bs = header.block_size
        at = {
            "key-block": header.key_offset * bs,
            "data-block": (header.key_offset + 1) * bs,
            "last-block": len(raw) - bs,
            "superblock": header.superblock_at,
        }[where]
        raw[at : at + bs] = random.Random(where).randbytes(bs)
        undo.write_bytes(bytes(raw))
        refused = run("e2undo", str(undo), loop)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert Path(loop).read_bytes() == after  # not one block written back
    finally:
        loopdev.loop_detach(loop)


@needs_root
def test_an_unusable_undo_area_stops_the_boot_and_changes_nothing(tmp_path: Path) -> None:
    # resize2fs was cut off (the progress file says so), and the area holds noise (what
    # tampering with the encrypted area gives): the boot stops with a clear error; the
    # file system, the area and the progress file are left as they were, nothing reformatted.
    state = tmp_path / "state"
    state.mkdir()
    loop, _ = make_fs(state / "encrypted.img", 384 * MIB, 40, seed=22)
    area = PlainUndoDir(tmp_path / "area")
    try:
        fs_uuid = run("blkid", "-s", "UUID", "-o", "value", loop).stdout.strip()
        req = ShrinkRequest(LUKS, 384 * MIB, 200 * MIB, 200 * MIB)
        request_file.write_request(state, req)
        prog = Progress(LUKS, fs_uuid, req.current, req.size, Step.RESIZE2FS, 1, NONCE)
        request_file.write_progress(state, prog)
        where = area.make(bytes.fromhex(NONCE), 0)
        undo_file.path(where).write_bytes(random.Random(1).randbytes(64 * 1024))
        before = Path(loop).read_bytes()
        with pytest.raises(offline_shrink.OfflineShrinkError) as err:
            offline_shrink.recover_interrupted_shrink(state, loop, quiet_report(), undo_area=area)
        assert "cannot be used" in str(err.value) and "nothing was changed" in str(err.value.hint)
        assert Path(loop).read_bytes() == before
        assert request_file.read_progress(state) == prog
        assert undo_file.path(where).exists()
    finally:
        loopdev.loop_detach(loop)


@needs_root
def test_a_plain_undo_file_would_hold_the_inner_plaintext(tmp_path: Path) -> None:
    # Why the area is encrypted: resize2fs -z saves the old contents of the blocks it
    # overwrites, here the names of files whose inodes it moves and remnants of deleted ones.
    marker = b"PYSTATE-MARKER-" + os.urandom(8).hex().encode()
    loop, _ = make_fs(tmp_path / "fs.img", 384 * MIB, 0, seed=23)
    mnt = tmp_path / "mnt"
    try:
        mount_api.mount(loop, str(mnt), "ext4", 0, None)
        try:
            # Marker files first (the front), then data up into the tail; the markers and
            # the front half of the data deleted: the shrink moves the tail's data into the
            # freed front blocks, whose old contents (the markers) go to the undo file.
            for i in range(100):
                (mnt / f"{marker.decode()}-{i}").write_bytes(marker * 8192)
            for i in range(280):
                (mnt / f"fill{i}").write_bytes(bytes(MIB))
            for i in range(100):
                (mnt / f"{marker.decode()}-{i}").unlink()
            for i in range(180):
                (mnt / f"fill{i}").unlink()
        finally:
            mount_api.umount2(str(mnt))
        assert run("e2fsck", "-f", "-p", loop).returncode in (0, 1)
        undo = tmp_path / "u.e2undo"
        assert run("resize2fs", "-z", str(undo), loop, "180M").returncode == 0
        assert marker in undo.read_bytes()
    finally:
        loopdev.loop_detach(loop)


@needs_root
@pytest.mark.parametrize("progress_bytes", [None, b"{not json", b'{"version": 1}'])
def test_an_undo_area_without_a_valid_progress_file_is_never_opened(
    tmp_path: Path, progress_bytes: bytes | None
) -> None:
    # No nonce, no key: the area is removed unopened; with an invalid progress file (resize2fs
    # may have run) e2fsck -p checks the file system first and the request is dropped.
    state = tmp_path / "state"
    state.mkdir()
    loop, _ = make_fs(state / "encrypted.img", 256 * MIB, 8, seed=24)
    opened: list[bytes] = []

    class Watched(PlainUndoDir):
        def open(self, nonce: bytes) -> Path:
            opened.append(nonce)
            return super().open(nonce)

    area = Watched(tmp_path / "area")
    try:
        request_file.write_request(state, ShrinkRequest(LUKS, 256 * MIB, 200 * MIB, 200 * MIB))
        if progress_bytes is not None:
            (state / ".pystate/shrink-progress").write_bytes(progress_bytes)
        undo_file.path(area.make(bytes(32), 0)).write_bytes(b"E2UNDO02" + bytes(4088))
        detail = offline_shrink.recover_interrupted_shrink(
            state, loop, quiet_report(), undo_area=area
        )
        assert detail is not None and not opened and not area.exists(), detail
        assert request_file.read_progress(state) is None
        if progress_bytes is None:
            assert "removed, not applied" in detail
            assert request_file.read_request(state) is not None
        else:
            assert "e2fsck -p" in detail and request_file.read_request(state) is None, detail
    finally:
        loopdev.loop_detach(loop)
