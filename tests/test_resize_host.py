"""The resize service on the host: everything but dm-crypt (the host has no device-mapper).

Real loop devices (direct I/O) over real image files, real resize2fs, btrfs and e2fsck:
grow and shrink go through resize.py's own code path with the cryptsetup step left out
(``Volume.crypt_name=None``). Also: the shrink request against hostile contents, the
offline shrink of the initrd on an unmounted ext4, the crash-order argument as tables, the
service's poll interval, and the policy under hostile statvfs values.

No mocks. One limitation of this host: its capability set lacks CAP_SYS_RESOURCE, which
ext4's online resize ioctl needs, so the online ext4 grow is skipped here (the QEMU tests
run it); btrfs grows and shrinks online here for real.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CAP_SYS_RESOURCE, PlainUndoDir, has_cap, needs_root
from hypothesis import given, settings
from hypothesis import strategies as st

from pystate_initrd.booted import resized
from pystate_initrd.config import Config
from pystate_initrd.formats import shrink_request, superblock
from pystate_initrd.formats.resize_policy import GIB, MIB, Action, PolicyParams, Space, decide
from pystate_initrd.initrd import offline_shrink
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.system import block, loopdev, mount_api
from pystate_initrd.volume import request_file, resize

UUID = "0b0e7ab4-8a3c-4b8e-9d5a-3f0b7c9e1a2d"


needs_online_ext4 = pytest.mark.skipif(
    not has_cap(CAP_SYS_RESOURCE),
    reason="ext4 online resize needs CAP_SYS_RESOURCE, which this host lacks (QEMU tests it)",
)


def quiet_report() -> BootReport:
    return BootReport(Log(kmsg_path="/nonexistent"))


# --- the invariant and the crash order (pure tables) ---------------------------------------


def simulate(steps: tuple[str, ...], before: int, after: int, header: int) -> list[resize.Sizes]:
    """The layers' sizes after each step of a grow or online shrink, as resize.py orders them.

    Each step changes exactly one layer, to the value the real step gives it.
    """
    file, loop, dev, fs = before, before, before - header, before - header
    states = [resize.Sizes(file, loop, dev, fs)]
    for step in steps:
        if step == "allocate":
            file = after
        elif step == "loop-capacity":
            loop = file
        elif step == "crypt-resize":
            dev = min(loop - header, after - header)
        elif step in ("fs-grow", "fs-shrink"):
            fs = after - header
        elif step == "truncate":
            file = after
        states.append(resize.Sizes(file, loop, dev, fs))
    return states


@pytest.mark.parametrize(
    ("steps", "before", "after"),
    [
        (resize.GROW_STEPS, 1024 * MIB, 1536 * MIB),
        (resize.GROW_STEPS, 256 * MIB, 257 * MIB),
        (resize.SHRINK_STEPS, 1536 * MIB, 1024 * MIB),
        (resize.SHRINK_STEPS, 300 * MIB, 256 * MIB),
    ],
)
def test_every_step_keeps_the_invariant(steps: tuple[str, ...], before: int, after: int) -> None:
    # A crash after any step leaves file >= loop >= mapping + header >= fs + header ...
    for state in simulate(steps, before, after, 16 * MIB):
        assert state.problems(16 * MIB) == [], state
    # ... and at the next boot the loop and the mapping are rebuilt from the file alone,
    # so what matters is that the file system never exceeds file - header.
    for state in simulate(steps, before, after, 16 * MIB):
        assert state.fs <= state.file - 16 * MIB


@pytest.mark.parametrize(
    ("wrong_order", "broken_after"),
    [
        # The mistakes the order rules out, each caught by Sizes.problems().
        (("fs-grow",), "fs-grow"),  # the fs grown before the file: fs > device
        (("truncate",), "truncate"),  # a shrink that truncates first: mapping > file
    ],
)
def test_the_wrong_order_is_caught(wrong_order: tuple[str, ...], broken_after: str) -> None:
    states = simulate(
        wrong_order, 1024 * MIB, 1536 * MIB if "fs-grow" in wrong_order else 512 * MIB, 0
    )
    assert states[-1].problems(0), (broken_after, states[-1])


# What a crash right after each step leaves, and what the next boot does (docs/resize.md).
CRASH_TABLE = [
    ("grow", "allocate", "file larger; loop+mapping made from it at boot; fs smaller", "finish"),
    ("grow", "loop-capacity", "as after allocate", "finish"),
    ("grow", "crypt-resize", "as after allocate", "finish"),
    ("grow", "fs-grow", "complete", "nothing"),
    ("shrink", "fs-shrink", "fs smaller than its device", "undo"),
    ("shrink", "sync", "as after fs-shrink", "undo"),
    ("shrink", "crypt-resize", "as after fs-shrink (the mapping is rebuilt at boot)", "undo"),
    ("shrink", "truncate", "complete: file = header + fs", "nothing"),
    ("shrink", "loop-capacity", "complete", "nothing"),
]


@pytest.mark.parametrize(("kind", "step", "what", "next_boot"), CRASH_TABLE)
def test_crash_after_each_step(kind: str, step: str, what: str, next_boot: str) -> None:
    steps = resize.GROW_STEPS if kind == "grow" else resize.SHRINK_STEPS
    before, after, header = 1024 * MIB, (1536 if kind == "grow" else 768) * MIB, 16 * MIB
    state = simulate(steps[: steps.index(step) + 1], before, after, header)[-1]
    # At the next boot the loop device covers the whole file and the mapping the rest of it.
    rebuilt = resize.Sizes(state.file, state.file, state.file - header, state.fs)
    assert rebuilt.problems(header) == []
    complete = rebuilt.fs + resize.FINISH_SLACK > rebuilt.device
    assert (next_boot == "nothing") == complete, (step, rebuilt)
    if next_boot == "finish":
        assert rebuilt.file == after  # reconcile grows the fs to the new size
    if next_boot == "undo":
        assert rebuilt.file == before  # reconcile grows the fs back to the old size


# --- the shrink request: form and hostile contents ---------------------------------------


def good_request(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "version": 1,
        "luks_uuid": UUID,
        "current": 2048 * MIB,
        "size": 1024 * MIB,
        "fs_size": 1024 * MIB - 16 * MIB,
        "requested": 1_700_000_000,
    }
    value.update(changes)
    return value


def test_request_round_trip() -> None:
    req = shrink_request.parse_request(json.dumps(good_request()).encode())
    assert shrink_request.parse_request(json.dumps(req.to_json()).encode()) == req


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "not ASCII JSON"),
        (b"\xff\xfe", "not ASCII JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"{" * 100000, "over 4096"),
        (b"[" * 2000 + b"]" * 2000, "not ASCII JSON"),  # deep nesting
        (json.dumps(good_request(extra=1)).encode(), "keys"),
        (json.dumps({k: v for k, v in good_request().items() if k != "size"}).encode(), "keys"),
        (json.dumps(good_request(version=2)).encode(), "version 2"),
        (json.dumps(good_request(size="1G")).encode(), "is not a size"),
        (json.dumps(good_request(size=True)).encode(), "is not a size"),
        (json.dumps(good_request(size=1.5)).encode(), "is not a size"),
        (json.dumps(good_request(size=-MIB)).encode(), "is not a size"),
        (json.dumps(good_request(size=1 << 70)).encode(), "is not a size"),
        (json.dumps(good_request(size=1024 * MIB + 1)).encode(), "whole MiB"),
        (json.dumps(good_request(fs_size=1000)).encode(), "4 KiB blocks"),
        (json.dumps(good_request(fs_size=0)).encode(), "4 KiB blocks"),
        (json.dumps(good_request(fs_size=2048 * MIB)).encode(), "larger than its size"),
        (json.dumps(good_request(size=2048 * MIB, fs_size=2000 * MIB)).encode(), "not below"),
        (json.dumps(good_request(size=4096 * MIB, fs_size=4000 * MIB)).encode(), "not below"),
        (json.dumps(good_request(luks_uuid="../../etc")).encode(), "lowercase UUID"),
        (json.dumps(good_request(luks_uuid=UUID.upper())).encode(), "lowercase UUID"),
        (json.dumps(good_request(luks_uuid=7)).encode(), "lowercase UUID"),
        (b'{"size": 1, "size": 2}', "keys"),
    ],
)
def test_hostile_requests_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(shrink_request.RequestError, match=error):
        shrink_request.parse_request(data)


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_parse_request_only_raises_request_error(data: bytes) -> None:
    try:
        req = shrink_request.parse_request(data)
    except shrink_request.RequestError:
        return
    assert req.size < req.current and req.fs_size <= req.size


@pytest.mark.parametrize(
    ("changes", "image_size", "reason"),
    [
        ({}, 2048 * MIB, None),
        ({"luks_uuid": "1" * 8 + "-" + "1" * 27}, 2048 * MIB, "not " + UUID),
        ({"fs_size": 1024 * MIB - 8 * MIB}, 2048 * MIB, "is not size"),
        ({"size": 128 * MIB, "fs_size": 112 * MIB}, 2048 * MIB, "below the minimum"),
        ({}, 3072 * MIB, "stale"),  # the image grew since the request was made
        ({}, 1024 * MIB, "stale"),  # already carried out
    ],
)
def test_validate_request_against_the_image(
    changes: dict[str, object], image_size: int, reason: str | None
) -> None:
    req = shrink_request.parse_request(json.dumps(good_request(**changes)).encode())
    why = shrink_request.validate_request(
        req, luks_uuid=UUID, header=16 * MIB, image_size=image_size, min_image_size=256 * MIB
    )
    assert (why is None) if reason is None else (why is not None and reason in why), why


def test_request_file_written_atomically_and_never_followed(tmp_path: Path) -> None:
    req = shrink_request.parse_request(json.dumps(good_request()).encode())
    path = request_file.write_request(tmp_path, req)
    assert path == tmp_path / ".pystate/shrink-request"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert request_file.pending_request(tmp_path) == req
    assert not list((tmp_path / ".pystate").glob(".*tmp"))
    assert request_file.remove_request(tmp_path)
    assert request_file.pending_request(tmp_path) is None
    # A symlink planted where the request goes is never followed, for reading or removal.
    secret = tmp_path / "secret"
    secret.write_text("not json")
    (tmp_path / ".pystate/shrink-request").symlink_to(secret)
    assert "cannot be opened" in str(request_file.pending_request(tmp_path))
    assert request_file.remove_request(tmp_path)
    assert secret.read_text() == "not json"
    # A directory, a FIFO: reported, removed.
    (tmp_path / ".pystate/shrink-request").mkdir()
    assert "not a regular file" in str(request_file.pending_request(tmp_path))
    assert request_file.remove_request(tmp_path)
    os.mkfifo(tmp_path / ".pystate/shrink-request")
    assert "not a regular file" in str(
        request_file.pending_request(tmp_path)
    )  # O_NONBLOCK: no hang
    assert request_file.remove_request(tmp_path)


def test_pystate_dir_as_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / ".pystate").symlink_to(elsewhere)
    req = shrink_request.parse_request(json.dumps(good_request()).encode())
    with pytest.raises(resize.ResizeError, match="not a directory"):
        request_file.write_request(state, req)
    assert list(elsewhere.iterdir()) == []


# --- superblocks (pure, against real mkfs output) ----------------------------------------


@pytest.mark.parametrize("fstype", ["ext4", "btrfs"])
def test_fs_size_from_real_superblocks(fstype: str, tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(300 * MIB)
    mkfs = ["mkfs.ext4", "-q", "-F"] if fstype == "ext4" else ["mkfs.btrfs", "-q", "-f"]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    head = image.read_bytes()[:0x10100]
    assert superblock.fs_size(head, fstype) == 300 * MIB
    assert superblock.fs_size(bytes(0x10100), fstype) is None
    if fstype == "ext4":
        usage = superblock.ext4_usage(head)
        assert usage is not None and usage.size == 300 * MIB and 0 < usage.used < 40 * MIB
        out = subprocess.run(
            ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=False
        )
        free = next(
            int(x.split(":")[1]) for x in out.stdout.splitlines() if x.startswith("Free blocks:")
        )
        assert usage.free == free  # dumpe2fs as the oracle


# --- the service's poll interval (pure) --------------------------------------------------


@pytest.mark.parametrize(
    ("prev", "free", "prev_free", "buffer", "expected"),
    [
        (5.0, 900 * MIB, 1000 * MIB, GIB, 0.5),  # within one buffer of the watermark
        (5.0, 300 * MIB, None, GIB, 0.5),  # below the watermark
        (1.0, 10 * GIB, None, GIB, 2.0),  # idle: back off
        (20.0, 10 * GIB, 10 * GIB, GIB, 30.0),  # idle: capped
        (1.0, 10 * GIB, 10 * GIB + 100 * MIB, GIB, (10 * GIB - GIB // 2) / (100 * MIB) / 4),
        (1.0, 2 * GIB, 3 * GIB, GIB, 0.5),  # fast writer: floor
    ],
)
def test_next_interval(
    prev: float, free: int, prev_free: int | None, buffer: int, expected: float
) -> None:
    assert resized.next_interval(prev, free, prev_free, buffer) == pytest.approx(expected)


@given(
    st.floats(0.01, 100),
    st.integers(0, 1 << 50),
    st.one_of(st.none(), st.integers(0, 1 << 50)),
    st.integers(0, 1 << 40),
)
def test_next_interval_bounded(prev: float, free: int, prev_free: int | None, buf: int) -> None:
    assert 0.5 <= resized.next_interval(prev, free, prev_free, buf) <= 30.0


# --- hostile statvfs values: never below used + margin -----------------------------------

sizes = st.integers(-(1 << 62), 1 << 62)


@given(sizes, sizes, sizes, st.sampled_from([0, 4096, 16 * MIB, 12345]), sizes, sizes, sizes)
@settings(max_examples=500, deadline=None)
def test_policy_never_below_used_plus_margin(
    outer_size: int, outer_free: int, image: int, header: int, inner: int, used: int, free: int
) -> None:
    space = Space(outer_size, outer_free, image, header, inner, used, free)
    d = decide(space, PolicyParams())
    if d.action is Action.SHRINK:
        assert d.target >= header + max(0, used) + d.margin
        assert d.target >= 256 * MIB
    # and by hand: `pystate resize --to` never goes below the floor either
    manual = resized.manual_decision(d, max(0, used) // 2, "ext4")
    if manual.action is Action.SHRINK:
        assert manual.target >= d.floor


# --- real loop devices -------------------------------------------------------------------


@contextlib.contextmanager
def plain_volume(tmp_path: Path, fstype: str, size: int) -> Iterator[resize.Volume]:
    """state/encrypted.img with a bare file system, on a direct-I/O loop, mounted."""
    state = tmp_path / "state"
    (state / "encrypted").mkdir(parents=True)
    image = state / "encrypted.img"
    fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
    block.fallocate(fd, 0, 0, size)
    os.close(fd)
    mkfs = ["mkfs.ext4", "-q", "-F"] if fstype == "ext4" else ["mkfs.btrfs", "-q", "-f"]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    loop = loopdev.loop_attach(str(image), direct_io=True)
    try:
        mount_api.mount(loop.path, str(state / "encrypted"), fstype, 0, None)
        try:
            yield resize.find_volume(state, crypt_name=None)
        finally:
            with contextlib.suppress(OSError):
                mount_api.umount2(str(state / "encrypted"))
    finally:
        loopdev.loop_detach(loop.path)


def write_random(path: Path, mib: int) -> str:
    data = os.urandom(mib * MIB)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@needs_root
def test_btrfs_grow_and_shrink_online(tmp_path: Path) -> None:
    with plain_volume(tmp_path, "btrfs", 300 * MIB) as vol:
        digest = write_random(vol.mountpoint / "data", 20)
        change = resize.grow(vol, 512 * MIB)
        assert [s for s, _ in change.steps] == list(resize.GROW_STEPS)
        assert resize.sizes(vol) == resize.Sizes(512 * MIB, 512 * MIB, 512 * MIB, 512 * MIB)
        assert os.stat(vol.image).st_blocks * 512 >= 512 * MIB  # fully allocated
        assert os.statvfs(vol.mountpoint).f_blocks * 4096 > 400 * MIB
        change = resize.shrink_online(vol, 280 * MIB)
        assert [s for s, _ in change.steps] == list(resize.SHRINK_STEPS)
        assert resize.sizes(vol) == resize.Sizes(280 * MIB, 280 * MIB, 280 * MIB, 280 * MIB)
        assert resize.reconcile(vol) is None
        subprocess.run(["sync"], check=True)
        assert hashlib.sha256((vol.mountpoint / "data").read_bytes()).hexdigest() == digest


@needs_root
def test_btrfs_shrink_below_its_data_changes_nothing(tmp_path: Path) -> None:
    with plain_volume(tmp_path, "btrfs", 400 * MIB) as vol:
        write_random(vol.mountpoint / "data", 200)
        subprocess.run(["sync"], check=True)
        with pytest.raises(resize.ResizeError, match="nothing was changed"):
            resize.shrink_online(vol, 150 * MIB)
        assert resize.sizes(vol).file == 400 * MIB


@needs_root
def test_reconcile_finishes_an_interrupted_grow(tmp_path: Path) -> None:
    with plain_volume(tmp_path, "btrfs", 300 * MIB) as vol:
        # A grow cut off after its first step: the file is larger, nothing above it.
        fd = os.open(vol.image, os.O_RDWR)
        block.fallocate(fd, 0, 300 * MIB, 100 * MIB)
        os.close(fd)
        assert resize.sizes(vol).loop == 300 * MIB
        change = resize.reconcile(vol)
        assert change is not None and change.action == "finish"
        assert resize.sizes(vol) == resize.Sizes(400 * MIB, 400 * MIB, 400 * MIB, 400 * MIB)


@needs_root
def test_grow_refused_without_outer_space_changes_nothing(tmp_path: Path) -> None:
    # A small outer file system: fallocate fails with ENOSPC, the file keeps its size.
    outer = tmp_path / "outer.img"
    with open(outer, "wb") as f:
        f.truncate(200 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(outer)], check=True)
    loop = loopdev.loop_attach(str(outer))
    mnt = tmp_path / "outer"
    mnt.mkdir()
    mount_api.mount(loop.path, str(mnt), "ext4", 0, None)
    try:
        with plain_volume(mnt, "btrfs", 120 * MIB) as vol:
            with pytest.raises(resize.ResizeError, match="nothing was changed"):
                resize.grow(vol, 400 * MIB)
            assert resize.sizes(vol).file == 120 * MIB
            assert os.stat(vol.image).st_blocks * 512 < 130 * MIB  # the blocks given back
    finally:
        mount_api.umount2(str(mnt))
        loopdev.loop_detach(loop.path)


@needs_root
@needs_online_ext4
def test_ext4_grow_online(tmp_path: Path) -> None:
    with plain_volume(tmp_path, "ext4", 300 * MIB) as vol:
        resize.grow(vol, 512 * MIB)
        assert resize.sizes(vol).fs == 512 * MIB


@needs_root
def test_service_step_grows_btrfs_and_records_status(tmp_path: Path) -> None:
    with plain_volume(tmp_path, "btrfs", 300 * MIB) as vol:
        write_random(vol.mountpoint / "data", 200)
        subprocess.run(["sync"], check=True)
        params = PolicyParams(buffer_min=128 * MIB, margin_min=16 * MIB, reserve_min=16 * MIB)
        status = tmp_path / "resize.json"
        service = resized.Service(vol, params, Log(kmsg_path="/nonexistent"), status_file=status)
        decision, change = service.step()
        assert decision.action is Action.GROW, decision.describe()
        assert change is not None and change.after == decision.target
        saved = json.loads(status.read_text())
        assert saved["last_change"]["action"] == "grow"
        assert saved["decision"]["action"] == "grow"
        view = resized.status_view(vol.state_dir, status)
        assert any("last change grow" in line for line in resized.status_lines(view))


# --- the offline shrink (the initrd's half), on an unmounted ext4 ------------------------


@contextlib.contextmanager
def unmounted_ext4(tmp_path: Path, size: int, data_mib: int) -> Iterator[tuple[Path, str, str]]:
    """(state dir, loop device, digest of the data) of a bare ext4 image, not mounted."""
    state = tmp_path / "state"
    with plain_volume(tmp_path, "ext4", size) as vol:
        digest = write_random(vol.mountpoint / "data", data_mib)
    loop = loopdev.loop_attach(str(state / "encrypted.img"), direct_io=True)
    try:
        yield state, loop.path, digest
    finally:
        loopdev.loop_detach(loop.path)


def request_shrink(state: Path, size: int, current: int) -> None:
    req = shrink_request.ShrinkRequest(UUID, current, size, size, 0)  # no LUKS: fs_size = size
    request_file.write_request(state, req)


def read_back(loop: str, tmp_path: Path) -> str:
    mnt = tmp_path / "check"
    mnt.mkdir(exist_ok=True)
    mount_api.mount(loop, str(mnt), "ext4", mount_api.MS_RDONLY, None)
    try:
        return hashlib.sha256((mnt / "data").read_bytes()).hexdigest()
    finally:
        mount_api.umount2(str(mnt))


def shrink_now(state: Path, loop: str, tmp_path: Path) -> str | None:
    """The boot's offline shrink step on an unmounted ext4 image, undo file in tmp_path."""
    return offline_shrink.apply_pending_shrink(
        Config(), state, loop, quiet_report(), crypt_name=None, cmdline="",
        undo_area=PlainUndoDir(tmp_path / "undo"),
    )  # fmt: skip


@needs_root
def test_offline_shrink_applies_a_valid_request(tmp_path: Path) -> None:
    with unmounted_ext4(tmp_path, 512 * MIB, 64) as (state, loop, digest):
        request_shrink(state, 300 * MIB, 512 * MIB)
        detail = shrink_now(state, loop, tmp_path)
        assert detail is not None and "512 MiB -> 300 MiB" in detail, detail
        assert os.stat(state / "encrypted.img").st_size == 300 * MIB
        assert block.block_size_bytes(loop) == 300 * MIB
        assert request_file.pending_request(state) is None
        fsck = subprocess.run(
            ["e2fsck", "-f", "-n", loop], capture_output=True, text=True, check=False
        )
        assert fsck.returncode == 0, fsck.stdout
        assert read_back(loop, tmp_path) == digest
        # Nothing pending: nothing done.
        assert shrink_now(state, loop, tmp_path) is None


@needs_root
@pytest.mark.parametrize(
    ("size", "current", "error"),
    [
        (72 * MIB, 512 * MIB, "below the minimum"),  # under 256 MiB
        (256 * MIB, 1024 * MIB, "stale"),  # made for another image size
    ],
)
def test_offline_shrink_refuses_invalid_requests(
    size: int, current: int, error: str, tmp_path: Path
) -> None:
    with unmounted_ext4(tmp_path, 512 * MIB, 8) as (state, loop, digest):
        request_shrink(state, size, current)
        detail = shrink_now(state, loop, tmp_path)
        assert detail is not None and "ignored and removed" in detail and error in detail, detail
        assert os.stat(state / "encrypted.img").st_size == 512 * MIB
        assert request_file.pending_request(state) is None
        assert read_back(loop, tmp_path) == digest


@needs_root
def test_offline_shrink_never_below_used_plus_margin(tmp_path: Path) -> None:
    # 250 MiB of data: a forged request for 256 MiB would leave no margin: refused.
    with unmounted_ext4(tmp_path, 600 * MIB, 250) as (state, loop, digest):
        request_shrink(state, 256 * MIB, 600 * MIB)
        detail = shrink_now(state, loop, tmp_path)
        assert detail is not None and "below used" in detail, detail
        assert os.stat(state / "encrypted.img").st_size == 600 * MIB
        assert read_back(loop, tmp_path) == digest


@needs_root
def test_offline_shrink_garbage_request_removed(tmp_path: Path) -> None:
    with unmounted_ext4(tmp_path, 300 * MIB, 4) as (state, loop, _):
        (state / ".pystate").mkdir()
        (state / ".pystate/shrink-request").write_bytes(b"\x00" * 5000)
        detail = shrink_now(state, loop, tmp_path)
        assert detail is not None and "over 4096" in detail
        assert not (state / ".pystate/shrink-request").exists()


@needs_root
def test_offline_shrink_repeated_after_a_crash_finishes(tmp_path: Path) -> None:
    # A cut after resize2fs (before the truncate): the request is still there, the image
    # still large; the next boot's run resizes to the same size (nothing to do) and ends it.
    with unmounted_ext4(tmp_path, 512 * MIB, 16) as (state, loop, digest):
        # resize2fs wants a check newer than the last mount (as apply_pending_shrink does).
        subprocess.run(["e2fsck", "-f", "-p", loop], check=True, capture_output=True)
        subprocess.run(["resize2fs", loop, f"{300 * 1024}K"], check=True, capture_output=True)
        request_shrink(state, 300 * MIB, 512 * MIB)
        detail = shrink_now(state, loop, tmp_path)
        assert detail is not None and "-> 300 MiB" in detail
        assert os.stat(state / "encrypted.img").st_size == 300 * MIB
        assert read_back(loop, tmp_path) == digest


@pytest.mark.parametrize(
    ("size", "action", "target"),
    [
        (3 * GIB, Action.GROW, 3 * GIB),
        (3 * GIB + 12345, Action.GROW, 3 * GIB),  # rounded down to whole MiB
        (100 * GIB, Action.NONE, 2 * GIB),  # beyond the outer reserve: refused
        (GIB, Action.SHRINK, GIB),
        (580 * MIB, Action.NONE, 2 * GIB),  # below used + margin (592 MiB): refused
        (600 * MIB, Action.SHRINK, 600 * MIB),
        (2 * GIB, Action.NONE, 2 * GIB),
    ],
)
def test_resize_by_hand_keeps_the_hard_limits(size: int, action: Action, target: int) -> None:
    header = 16 * MIB
    space = Space(
        outer_size=10 * GIB,
        outer_free=5 * GIB,
        image_size=2 * GIB,
        header_size=header,
        inner_size=2 * GIB - header,
        inner_used=512 * MIB,
        inner_free=2 * GIB - header - 512 * MIB,
    )
    auto = decide(space, PolicyParams())
    manual = resized.manual_decision(auto, size, "ext4")
    assert (manual.action, manual.target) == (action, target), manual.reasons
    assert manual.fs_size == manual.target - header
    assert manual.offline is (action is Action.SHRINK)


@pytest.mark.parametrize(("fs", "target"), [("ext4", 256 * MIB), ("btrfs", 272 * MIB)])
def test_btrfs_is_never_shrunk_below_256_mib(fs: str, target: int) -> None:
    # Found in QEMU: BTRFS_IOC_RESIZE refuses sizes under 256 MiB with EINVAL, so a btrfs
    # image's floor is the header plus 256 MiB (resize_policy.BTRFS_MIN_FS).
    header = 16 * MIB
    space = Space(10 * GIB, 5 * GIB, 445 * MIB, header, 429 * MIB, 20 * MIB, 400 * MIB, fs)
    d = decide(space, PolicyParams(buffer_min=64 * MIB))
    assert (d.action, d.target) == (Action.SHRINK, target), d.describe()


@needs_root
def test_offline_shrink_failure_does_not_stop_the_boot(tmp_path: Path) -> None:
    # With a LUKS mapping named but none there (the host has no device-mapper) the shrink
    # cannot proceed: it says so, changes nothing, keeps the request, and does not raise.
    with unmounted_ext4(tmp_path, 512 * MIB, 8) as (state, loop, digest):
        request_shrink(state, 300 * MIB, 512 * MIB)
        detail = offline_shrink.apply_pending_shrink(
            Config(), state, loop, quiet_report(), device=loop, cmdline=""
        )
        assert detail is not None and "the boot goes on" in detail, detail
        assert os.stat(state / "encrypted.img").st_size == 512 * MIB
        assert isinstance(request_file.pending_request(state), shrink_request.ShrinkRequest)
        assert read_back(loop, tmp_path) == digest


def test_the_service_reads_the_configuration_the_initrd_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §9: the initrd's copy in /run/pystate wins over the booted system's /etc."""
    published, booted = tmp_path / "run.conf", tmp_path / "etc.conf"
    monkeypatch.setattr(resized, "PUBLISHED_CONFIG", published)
    monkeypatch.setattr(resized, "BOOTED_CONFIG", booted)
    booted.write_text("[resize]\nweights = 1:3\n")
    assert resized.load_params(None, {})[1].weights == (1, 3)  # no initrd of ours: /etc
    published.write_text("[resize]\nweights = 2:1\n")
    assert resized.load_params(None, {})[1].weights == (2, 1)
    published.write_text("# no /etc/pystate/pystate.conf in the initrd: built-in defaults\n")
    assert resized.load_params(None, {})[1].weights == PolicyParams().weights
    assert resized.load_params(booted, {})[1].weights == (1, 3)  # --config names a file
