"""pystate_initrd.system.linux for real: mounts, openat2/open_tree/move_mount, loop devices.

The mount and loop tests need root (marked, and skipped otherwise with the
reason). Every mount lives on a tmpfs mounted inside tmp_path and every loop
device is detached by a fixture, whatever happens in the test.

Fallbacks for kernels without openat2/open_tree/move_mount/mount_setattr
cannot be caused for real on this kernel: the tests that exercise them put the
call's name into libc.missing, which is exactly the state the module enters
after the kernel answered ENOSYS once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, needs_root

from pystate_initrd.system import _ffi_build, beneath, block, libc, loopdev, mount_api

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_BACKEND = Path(
    "/usr/lib/python3/dist-packages/_cffi_backend.cpython-311-x86_64-linux-gnu.so"
)
MiB = 1 << 20


# --- fixtures and helpers ---


def mountinfo_options(mount_point: Path) -> set[str] | None:
    """Per-mount options of the topmost mount at mount_point, or None if nothing is mounted."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            # field 5 is the mount point, octal-escaped; field 6 the per-mount options
            where = fields[4].encode().decode("unicode_escape")
            if where == str(mount_point):
                found = set(fields[5].split(","))
    return found


def mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs at tmp_path/t; lazily unmounted with everything below it afterwards."""
    where = tmp_path / "t"
    where.mkdir()
    mount_api.mount("tmpfs", str(where), "tmpfs", 0, "mode=0755")
    try:
        yield where
    finally:
        mount_api.umount2(str(where), mount_api.MNT_DETACH)


@pytest.fixture
def unmount_later() -> Iterator[list[Path]]:
    """Paths to unmount (lazily, in reverse) when the test ends."""
    paths: list[Path] = []
    try:
        yield paths
    finally:
        for path in reversed(paths):
            with contextlib.suppress(OSError):  # already unmounted by the test
                mount_api.umount2(str(path), mount_api.MNT_DETACH)


@pytest.fixture
def loops() -> Iterator[list[loopdev.LoopDevice]]:
    """Loop devices to detach when the test ends (after unmount_later's unmounts)."""
    devices: list[loopdev.LoopDevice] = []
    try:
        yield devices
    finally:
        for dev in devices:
            dev.close()
            with contextlib.suppress(OSError):  # already detached by the test
                loopdev.loop_detach(dev)


@pytest.fixture
def no_new_mount_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: a kernel older than 5.2 (open_tree, move_mount, mount_setattr answer ENOSYS)."""
    monkeypatch.setattr(libc, "missing", {"open_tree", "move_mount", "mount_setattr"})


def open_dir(path: Path) -> int:
    return os.open(path, O_PATH_DIR)


def sysfs_loop(dev: loopdev.LoopDevice, attr: str) -> str:
    return Path(f"/sys/block/loop{dev.number}/{attr}").read_text().strip()


def wait_detached(dev: loopdev.LoopDevice) -> bool:
    backing = Path(f"/sys/block/loop{dev.number}/loop/backing_file")
    for _ in range(100):
        if not backing.exists():
            return True
        time.sleep(0.02)
    return False


# --- the generated FFI module ---


def test_generate_loads_under_the_initrd_python(tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.exists() or not SYSTEM_BACKEND.exists():
        pytest.skip("needs Debian's /usr/bin/python3 and python3-cffi-backend")
    generated = _ffi_build.generate(tmp_path / "gen")
    assert generated == tmp_path / "gen" / "_linux_ffi.py"
    backend_dir = tmp_path / "backend"
    backend_dir.mkdir()
    shutil.copy(SYSTEM_BACKEND, backend_dir)
    # As in the initrd: no site, no cffi, no pycparser; only the backend .so and the module.
    script = f"""
import sys
sys.path[:0] = [{str(generated.parent)!r}, {str(backend_dir)!r}]
import _linux_ffi
ffi = _linux_ffi.ffi
libc = ffi.dlopen(None)
structs = ("loop_config", "loop_info64", "open_how", "mount_attr")
sizes = [ffi.sizeof("struct " + s) for s in structs]
rc = libc.umount2(b"/nonexistent/pystate", 0)
import _cffi_backend
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("cffi", "pycparser"))
print(sizes, rc, ffi.errno, _cffi_backend.__version__, leaked)
"""
    out = subprocess.run(
        [str(SYSTEM_PYTHON), "-I", "-S", "-c", script],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Sizes as gcc computes them from <linux/loop.h>, <linux/openat2.h>, <linux/mount.h>.
    assert out.strip() == f"[304, 232, 24, 32] -1 {errno.ENOENT} 1.15.1 []"


def test_generate_is_reproducible_and_names_its_declarations(tmp_path: Path) -> None:
    a = _ffi_build.generate(tmp_path / "a").read_bytes()
    b = _ffi_build.generate(tmp_path / "b").read_bytes()
    assert a == b
    assert f"CDEF_SHA256 = {_ffi_build.CDEF_SHA256!r}".encode() in a
    assert b"import _cffi_backend" in a and b"cffi." not in a
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["_linux_ffi.py"]


def test_ffi_build_command_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pystate_initrd.system._ffi_build", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == str(tmp_path / "_linux_ffi.py")
    assert (tmp_path / "_linux_ffi.py").is_file()


def test_syscall_numbers_match_the_headers() -> None:
    # asm-generic/unistd.h (aarch64) and the x86_64 table agree on the newer ones;
    # fstatfs is older and differs.
    for arch, fstatfs in (("x86_64", 138), ("aarch64", 44)):
        assert libc.SYSCALLS[arch] == {
            "open_tree": 428,
            "move_mount": 429,
            "openat2": 437,
            "mount_setattr": 442,
            "fstatfs": fstatfs,
        }


# --- open_beneath: openat2 and the O_NOFOLLOW walk, one table for both ---


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with a/b/file, symlinks of every kind, and a sibling 'outside'."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("outside")
    r = tmp_path / "root"
    (r / "a" / "b").mkdir(parents=True)
    (r / "a" / "b" / "file").write_text("inside")
    (r / "file").write_text("plain")
    (r / "link_out").symlink_to(tmp_path / "outside")
    (r / "a" / "rel_out").symlink_to("../../outside")
    (r / "a" / "inside_link").symlink_to("b")
    (r / "proc_root").symlink_to("/proc/self/root")
    (r / "dangling").symlink_to("nowhere")
    return r


BENEATH_CASES = [
    # relpath, flags, expected errno (None: opens, and must be beneath root)
    ("a/b", O_PATH_DIR, None),
    ("a/b/file", os.O_RDONLY, None),
    ("a/./b//", O_PATH_DIR, None),
    ("a/../a/b", O_PATH_DIR, None),
    (".", O_PATH_DIR, None),
    ("link_out", O_PATH_DIR, errno.ELOOP),
    ("link_out", os.O_PATH, errno.ELOOP),
    ("link_out/secret", os.O_RDONLY, errno.ELOOP),
    ("a/rel_out/secret", os.O_RDONLY, errno.ELOOP),
    ("a/inside_link", O_PATH_DIR, errno.ELOOP),
    ("a/inside_link/file", os.O_RDONLY, errno.ELOOP),
    ("proc_root/etc", O_PATH_DIR, errno.ELOOP),
    ("dangling", os.O_RDONLY | os.O_CREAT, errno.ELOOP),
    ("..", O_PATH_DIR, errno.EXDEV),
    ("../outside/secret", os.O_RDONLY, errno.EXDEV),
    ("a/../../outside", O_PATH_DIR, errno.EXDEV),
    ("a/b/../../..", O_PATH_DIR, errno.EXDEV),
    ("/etc", O_PATH_DIR, errno.EXDEV),
    ("missing", O_PATH_DIR, errno.ENOENT),
    ("a/missing/x", O_PATH_DIR, errno.ENOENT),
    ("file/x", O_PATH_DIR, errno.ENOTDIR),
    ("file", O_PATH_DIR, errno.ENOTDIR),
]


@pytest.mark.parametrize("how", ["openat2", "walk"])
@pytest.mark.parametrize(("relpath", "flags", "expected"), BENEATH_CASES)
def test_open_beneath_one(
    tree: Path, how: str, relpath: str, flags: int, expected: int | None
) -> None:
    opener = beneath.open_beneath if how == "openat2" else beneath.open_beneath_walk
    root_fd = open_dir(tree)
    try:
        if expected is None:
            fd = opener(root_fd, relpath, flags)
            try:
                opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
                assert opened == (tree / relpath).resolve()
                assert opened.is_relative_to(tree)
                assert os.get_inheritable(fd) is False
            finally:
                os.close(fd)
        else:
            with pytest.raises(OSError) as info:
                opener(root_fd, relpath, flags)
            assert info.value.errno == expected, info.value
            # errors name the path, relative ones under the root they were resolved in
            assert info.value.filename == (relpath if relpath[0] == "/" else f"{tree}/{relpath}")
    finally:
        os.close(root_fd)
    assert not (tree / "dangling").resolve(strict=False).exists()  # O_CREAT made nothing


def test_open_beneath_uses_the_walk_when_openat2_is_missing(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: a kernel before 5.6, where openat2 answers ENOSYS.
    monkeypatch.setattr(libc, "missing", {"openat2"})
    root_fd = open_dir(tree)
    try:
        fd = beneath.open_beneath(root_fd, "a/b/file", os.O_RDONLY)
        assert os.read(fd, 10) == b"inside"
        os.close(fd)
        with pytest.raises(OSError) as info:
            beneath.openat2(root_fd, "a", O_PATH_DIR)
        assert info.value.errno == errno.ENOSYS
    finally:
        os.close(root_fd)


def test_mkdir_beneath(tree: Path) -> None:
    root_fd = open_dir(tree)
    try:
        beneath.mkdir_beneath(root_fd, "new/deeper/still", 0o750)
        assert (tree / "new" / "deeper" / "still").is_dir()
        assert (tree / "new").stat().st_mode & 0o7777 == 0o750 & ~_umask()
        beneath.mkdir_beneath(root_fd, "a/b", 0o755)  # existing: fine, untouched
        assert (tree / "a" / "b" / "file").read_text() == "inside"
        for relpath, expected in [
            ("link_out/made", errno.ELOOP),
            ("a/rel_out/made", errno.ELOOP),
            ("dangling/made", errno.ELOOP),
            ("../outside/made", errno.EXDEV),
            ("a/../../made", errno.EXDEV),
            ("/tmp/made", errno.EXDEV),
            ("file/made", errno.ENOTDIR),
        ]:
            with pytest.raises(OSError) as info:
                beneath.mkdir_beneath(root_fd, relpath)
            assert info.value.errno == expected, (relpath, info.value)
            assert info.value.filename == (relpath if relpath[0] == "/" else f"{tree}/{relpath}")
    finally:
        os.close(root_fd)
    assert sorted(p.name for p in (tree.parent / "outside").iterdir()) == ["secret"]
    assert not (tree.parent / "made").exists() and not (tree / "nowhere").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- bind mounts on file descriptors ---


@pytest.mark.parametrize("api", ["open_tree", "old_mount_api"])
@pytest.mark.root
@needs_root
def test_bind_mount_fd_with_nosuid_nodev(
    tmpfs: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if api == "old_mount_api":
        # Simulated: a kernel before 5.2 (open_tree, move_mount, mount_setattr answer ENOSYS).
        monkeypatch.setattr(libc, "missing", {"open_tree", "move_mount", "mount_setattr"})
    (tmpfs / "state" / "home").mkdir(parents=True)
    (tmpfs / "state" / "home" / "hello").write_text("from state")
    (tmpfs / "sysroot" / "home").mkdir(parents=True)
    state_fd, sysroot_fd = open_dir(tmpfs / "state"), open_dir(tmpfs / "sysroot")
    try:
        src = beneath.open_beneath(state_fd, "home", O_PATH_DIR)
        tgt = beneath.open_beneath(sysroot_fd, "home", O_PATH_DIR)
        try:
            mount_api.bind_mount_fd(src, tgt, flags=mount_api.MS_NOSUID | mount_api.MS_NODEV)
        finally:
            os.close(src)
            os.close(tgt)
    finally:
        os.close(state_fd)
        os.close(sysroot_fd)
    target = tmpfs / "sysroot" / "home"
    assert (target / "hello").read_text() == "from state"
    options = mountinfo_options(target)
    assert options is not None and {"rw", "nosuid", "nodev"} <= options
    (target / "written").write_text("x")  # the same directory, not a copy
    assert (tmpfs / "state" / "home" / "written").exists()


@pytest.mark.root
@needs_root
def test_bind_mount_fd_when_only_mount_setattr_is_missing(
    tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: kernels 5.2-5.11 have open_tree/move_mount but not mount_setattr.
    monkeypatch.setattr(libc, "missing", {"mount_setattr"})
    (tmpfs / "src").mkdir()
    (tmpfs / "dst").mkdir()
    src, dst = open_dir(tmpfs / "src"), open_dir(tmpfs / "dst")
    try:
        mount_api.bind_mount_fd(src, dst, flags=mount_api.MS_NODEV | mount_api.MS_NOEXEC)
    finally:
        os.close(src)
        os.close(dst)
    options = mountinfo_options(tmpfs / "dst")
    assert options is not None and {"nodev", "noexec"} <= options
    assert "nosuid" not in options


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("api", ["open_tree", "old_mount_api"])
@pytest.mark.parametrize("recursive", [False, True])
def test_bind_mount_fd_recursive(
    tmpfs: Path, api: str, recursive: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if api == "old_mount_api":
        # Simulated: a kernel before 5.2.
        monkeypatch.setattr(libc, "missing", {"open_tree", "move_mount", "mount_setattr"})
    (tmpfs / "src" / "sub").mkdir(parents=True)
    (tmpfs / "dst").mkdir()
    mount_api.mount("tmpfs", str(tmpfs / "src" / "sub"), "tmpfs")
    (tmpfs / "src" / "sub" / "on_submount").write_text("x")
    src, dst = open_dir(tmpfs / "src"), open_dir(tmpfs / "dst")
    try:
        mount_api.bind_mount_fd(src, dst, recursive=recursive)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmpfs / "dst" / "sub").is_dir()
    assert (tmpfs / "dst" / "sub" / "on_submount").exists() == recursive


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("api", ["mount_setattr", "remount"])
def test_set_mount_flags_adds_and_keeps(
    tmpfs: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if api == "remount":
        # Simulated: a kernel before 5.12 (mount_setattr answers ENOSYS).
        monkeypatch.setattr(libc, "missing", {"mount_setattr"})
    (tmpfs / "src").mkdir()
    (tmpfs / "dst").mkdir()
    (tmpfs / "dst" / "below").mkdir()
    src, dst = open_dir(tmpfs / "src"), open_dir(tmpfs / "dst")
    try:
        mount_api.bind_mount_fd(src, dst, flags=mount_api.MS_NOEXEC | mount_api.MS_STRICTATIME)
        # dst still names the directory underneath the new mount: refused, not misapplied.
        with pytest.raises(OSError) as info:
            mount_api.set_mount_flags(dst, mount_api.MS_RDONLY)
        assert info.value.errno == errno.EINVAL
        assert info.value.filename == str(tmpfs / "dst")
    finally:
        os.close(src)
        os.close(dst)
    top = open_dir(tmpfs / "dst")  # opened after mounting: the new mount's root
    try:
        mount_api.set_mount_options(top, ["nosuid", "nodev"])
        mount_api.set_mount_flags(top, mount_api.MS_RDONLY)
    finally:
        os.close(top)
    options = mountinfo_options(tmpfs / "dst")
    assert options is not None and {"ro", "nosuid", "nodev", "noexec"} <= options
    assert not options & {"relatime", "noatime"}  # strictatime survived
    outer = mountinfo_options(tmpfs)
    assert outer is not None and "ro" not in outer and "nosuid" not in outer


def test_mount_flag_validation() -> None:
    assert mount_api.mount_flags(["nosuid", "nodev"]) == mount_api.MS_NOSUID | mount_api.MS_NODEV
    with pytest.raises(ValueError, match="'suid'"):
        mount_api.mount_flags(["suid"])
    with pytest.raises(ValueError, match="not a per-mount flag"):
        mount_api.bind_mount_fd(-1, -1, flags=mount_api.MS_BIND)
    with pytest.raises(ValueError, match="conflicting atime"):
        mount_api.set_mount_flags(-1, mount_api.MS_NOATIME | mount_api.MS_STRICTATIME)


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("how", ["openat2", "walk"])
def test_symlinked_target_is_refused_and_nothing_is_mounted_outside(
    tmpfs: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "walk":
        # Simulated: a kernel before 5.6 (openat2 answers ENOSYS).
        monkeypatch.setattr(libc, "missing", {"openat2"})
    outside = tmpfs / "outside"
    (outside / "home").mkdir(parents=True)
    (tmpfs / "state" / "home").mkdir(parents=True)
    sysroot = tmpfs / "sysroot"
    sysroot.mkdir()
    (sysroot / "home").symlink_to(outside / "home")  # an absolute symlink out
    (sysroot / "var").symlink_to("../outside")  # a relative one
    state_fd, root_fd = open_dir(tmpfs / "state"), open_dir(sysroot)
    try:
        src = beneath.open_beneath(state_fd, "home", O_PATH_DIR)
        try:
            for relpath in ("home", "var/home", "var/lib/flatpak"):
                with pytest.raises(OSError) as info:
                    tgt = beneath.open_beneath(root_fd, relpath, O_PATH_DIR)
                    mount_api.bind_mount_fd(src, tgt)  # never reached
                assert info.value.errno in (errno.ELOOP, errno.EXDEV)
                assert info.value.filename == f"{sysroot}/{relpath}"
                with pytest.raises(OSError) as info:
                    beneath.mkdir_beneath(root_fd, relpath)
                assert info.value.errno in (errno.ELOOP, errno.EXDEV)
        finally:
            os.close(src)
    finally:
        os.close(state_fd)
        os.close(root_fd)
    assert mounted_under(tmpfs) == [str(tmpfs)]
    assert sorted(p.name for p in outside.iterdir()) == ["home"]
    assert list((outside / "home").iterdir()) == []


# --- loop devices ---


def _make_ext4(image: Path, size: int, content: Path) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(image)],
        check=True,
        capture_output=True,
    )


@pytest.mark.root
@needs_root
def test_loop_device_over_ext4_image(
    tmp_path: Path, loops: list[loopdev.LoopDevice], unmount_later: list[Path]
) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from the image\n")
    image = tmp_path / "encrypted.img"  # tmp_path is on a file system with O_DIRECT
    _make_ext4(image, 32 * MiB, content)

    dev = loopdev.loop_attach(str(image), direct_io=True)
    loops.append(dev)
    assert dev.path == f"/dev/loop{dev.number}"
    assert dev.direct_io and not dev.read_only and not dev.autoclear and dev.fd is None
    assert sysfs_loop(dev, "loop/dio") == "1"
    assert sysfs_loop(dev, "loop/backing_file") == str(image)
    assert sysfs_loop(dev, "loop/autoclear") == "0"
    assert block.block_size_bytes(dev.path) == 32 * MiB
    assert block.logical_sector_size(dev.path) in (512, 4096)

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_api.mount(dev.path, str(mnt), "ext4", mount_api.MS_NOSUID | mount_api.MS_NODEV)
    unmount_later.append(mnt)
    assert (mnt / "hello.txt").read_text() == "hello from the image\n"

    # Grow online, as the resize service does (SPEC §7): extend, then LOOP_SET_CAPACITY.
    with open(image, "r+b") as f:
        block.fallocate(f.fileno(), 0, 0, 48 * MiB)
    assert block.block_size_bytes(dev.path) == 32 * MiB
    loopdev.loop_set_capacity(dev)
    fd = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert block.block_size_bytes(fd) == 48 * MiB
    finally:
        os.close(fd)

    mount_api.umount2(str(mnt))
    unmount_later.clear()
    loopdev.loop_detach(dev)
    assert wait_detached(dev)
    with pytest.raises(OSError) as info:
        loopdev.loop_detach(dev)  # nothing attached any more
    assert info.value.errno == errno.ENXIO
    assert info.value.filename == dev.path


@pytest.mark.root
@needs_root
def test_loop_direct_io_refused_falls_back_to_buffered(
    tmp_path: Path, loops: list[loopdev.LoopDevice], unmount_later: list[Path]
) -> None:
    ramfs = tmp_path / "ramfs"  # ramfs has no O_DIRECT at all
    ramfs.mkdir()
    mount_api.mount("ramfs", str(ramfs), "ramfs")
    unmount_later.append(ramfs)
    image = ramfs / "img"
    image.write_bytes(b"\0" * MiB)
    with pytest.raises(OSError) as info:
        os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
    assert info.value.errno == errno.EINVAL  # the premise of this test

    dev = loopdev.loop_attach(str(image), direct_io=True)
    loops.append(dev)
    assert dev.direct_io is False
    assert sysfs_loop(dev, "loop/dio") == "0"
    assert block.block_size_bytes(dev.path) == MiB


@pytest.mark.root
@needs_root
def test_loop_direct_io_needs_the_backing_sector_size(
    tmp_path: Path, loops: list[loopdev.LoopDevice], unmount_later: list[Path]
) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    # A file system on a 4096-byte-sector device, as on 4Kn disks.
    outer_img = tmp_path / "outer.img"
    with open(outer_img, "wb") as f:
        f.truncate(32 * MiB)
    outer = loopdev.loop_attach(str(outer_img), sector_size=4096)
    loops.append(outer)
    subprocess.run(["mkfs.ext4", "-q", "-F", outer.path], check=True, capture_output=True)
    mnt = tmp_path / "outer"
    mnt.mkdir()
    mount_api.mount(outer.path, str(mnt), "ext4")
    unmount_later.append(mnt)
    image = mnt / "encrypted.img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)

    small = loopdev.loop_attach(str(image), sector_size=512)  # 512-byte O_DIRECT: impossible
    loops.append(small)
    assert small.direct_io is False
    assert sysfs_loop(small, "loop/dio") == "0"
    loopdev.loop_detach(small)
    assert wait_detached(small)

    chosen = loopdev.loop_attach(str(image))  # the kernel picks the backing sector size
    loops.insert(0, chosen)  # detached before outer
    assert chosen.direct_io is True
    assert block.logical_sector_size(chosen.path) == 4096


@pytest.mark.root
@needs_root
def test_loop_read_only_with_4k_sectors(tmp_path: Path, loops: list[loopdev.LoopDevice]) -> None:
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    dev = loopdev.loop_attach(str(image), read_only=True, sector_size=4096)
    loops.append(dev)
    assert dev.read_only
    assert sysfs_loop(dev, "ro") == "1"
    assert block.logical_sector_size(dev.path) == 4096
    fd = os.open(dev.path, os.O_WRONLY | os.O_CLOEXEC)  # this kernel allows the open itself
    try:
        with pytest.raises(OSError) as info:
            os.write(fd, b"\0" * 4096)
        assert info.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    finally:
        os.close(fd)


@pytest.mark.root
@needs_root
def test_loop_autoclear_goes_with_the_last_close(
    tmp_path: Path, loops: list[loopdev.LoopDevice]
) -> None:
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(MiB)
    dev = loopdev.loop_attach(str(image), autoclear=True)
    loops.append(dev)
    assert dev.fd is not None and dev.autoclear
    assert sysfs_loop(dev, "loop/autoclear") == "1"
    dev.close()
    assert dev.fd is None
    assert wait_detached(dev)


# --- fallocate ---


def test_fallocate_keep_size_and_punch_hole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        block.fallocate(fd, 0, 0, 4 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 4 * MiB and st.st_blocks * 512 >= 4 * MiB
        block.fallocate(fd, block.FALLOC_FL_KEEP_SIZE, 4 * MiB, 4 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 4 * MiB and st.st_blocks * 512 >= 8 * MiB
        before = st.st_blocks * 512
        block.fallocate(fd, block.FALLOC_FL_PUNCH_HOLE | block.FALLOC_FL_KEEP_SIZE, 0, 4 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 4 * MiB and st.st_blocks * 512 <= before - 4 * MiB
        with pytest.raises(OSError) as info:
            block.fallocate(fd, block.FALLOC_FL_PUNCH_HOLE, 0, MiB)  # needs KEEP_SIZE
        assert info.value.errno == errno.EOPNOTSUPP
        assert info.value.filename == str(path)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as info:
            block.fallocate(fd, 0, 0, MiB)
        assert info.value.errno == errno.EBADF
        assert info.value.filename == str(path)
    finally:
        os.close(fd)


# --- every failure names its path ---


@pytest.mark.root
@needs_root
def test_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    cases: list[tuple[Callable[[], object], int, str, str | None]] = [
        (lambda: mount_api.mount(str(tmp_path), str(missing), None, mount_api.MS_BIND),
         errno.ENOENT, str(tmp_path), str(missing)),
        (lambda: mount_api.mount("tmpfs", str(missing), "tmpfs"), errno.ENOENT, str(missing), None),
        (lambda: mount_api.umount2(str(tmp_path)), errno.EINVAL, str(tmp_path), None),
        (lambda: mount_api.open_tree(libc.AT_FDCWD, str(missing), mount_api.OPEN_TREE_CLONE),
         errno.ENOENT, str(missing), None),
        (lambda: beneath.openat2(libc.AT_FDCWD, str(missing), os.O_RDONLY),
         errno.ENOENT, str(missing), None),
        (lambda: loopdev.loop_attach(str(missing)), errno.ENOENT, str(missing), None),
        (lambda: block.block_size_bytes(str(plain)), errno.ENOTTY, str(plain), None),
        (lambda: block.logical_sector_size(str(missing)), errno.ENOENT, str(missing), None),
    ]  # fmt: skip
    for call, expected, filename, filename2 in cases:
        with pytest.raises(OSError) as info:
            call()
        assert (info.value.errno, info.value.filename, info.value.filename2) == (
            expected,
            filename,
            filename2,
        )
        assert filename in str(info.value)
