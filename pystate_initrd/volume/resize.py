"""One resize step of encrypted.img, in the order that keeps it crash safe (SPEC §7).

The stack, bottom up: the image file on /state -> a loop device (direct I/O) -> dm-crypt
``pystate-encrypted`` (the LUKS2 data segment, "dynamic": it covers the file from the
header to its end) -> the inner file system. A resize changes the four sizes one after
the other. **Invariant: file and loop device >= header + mapping >= header + file system**
(the loop may briefly exceed the file after a shrink's truncate: nothing maps that tail).
Each step below keeps it, so a crash between any two steps leaves a stack that opens at
the next boot (the loop and the mapping are made afresh from the file's size) with a
file system no larger than its device, and ``reconcile()`` finishes or undoes the rest:

grow (online, ext4 and btrfs)       shrink (online, btrfs)
  1 allocate  file: fallocate         1 fs-shrink     btrfs filesystem resize SIZE
  2 loop-capacity LOOP_SET_CAPACITY   2 sync          the smaller fs on the disk first
  3 crypt-resize DM table reload     3 crypt-resize  DM table reload (size)
  4 fs-grow   resize2fs / btrfs max   4 truncate      file: ftruncate + fsync
                                      5 loop-capacity LOOP_SET_CAPACITY

An ext4 shrink is offline: ``write_request()`` leaves a request in ``<state>/.pystate/``
and the initrd carries it out before mounting (offline_shrink.py). docs/resize.md has
the crash table for every step and why ``cryptsetup resize`` needs no key here.

The mapping is resized by reloading its table (system/devmapper.py: no file-system freeze);
where that fails, crypt_resize(): libcryptsetup's in process when it loads, else
``cryptsetup resize`` (system/libcryptsetup.py). Every external command goes through
run.py; ``hook(step)`` is called after each step (a test build's crash tests cut the power
there: volume/hooks.py).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import mountinfo, superblock
from pystate_initrd.formats.dm_table import DmTableError
from pystate_initrd.formats.luks2 import LuksError
from pystate_initrd.formats.names import DM_NAME, IMAGE, MOUNT_DIR
from pystate_initrd.formats.resize_policy import FS_BLOCK, MIB, Space, human_size
from pystate_initrd.log import installed as installed_log
from pystate_initrd.system import block, devmapper, libcryptsetup, loopdev
from pystate_initrd.system.run import CommandError, run
from pystate_initrd.volume.hooks import Hook, no_hook

SECTOR = 512  # cryptsetup resize --size counts 512-byte sectors whatever the LUKS sector size
# resize2fs leaves out a last block group too small to hold its own metadata: a file system
# up to this much smaller than its device is complete, not an interrupted grow.
FINISH_SLACK = 16 * MIB

GROW_STEPS = ("allocate", "loop-capacity", "crypt-resize", "fs-grow")
SHRINK_STEPS = ("fs-shrink", "sync", "crypt-resize", "truncate", "loop-capacity")


class ResizeError(PystateError):
    """A resize step failed; the message says which, and that the stack is still consistent."""


# --- what is resized ---------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """encrypted.img as it is set up in the running system.

    crypt_name is None for a file system straight on the loop device (the host tests,
    which have no device-mapper): the same steps minus cryptsetup.
    """

    image: Path
    loop: str  # /dev/loopN
    mountpoint: Path
    fstype: str  # "ext4" or "btrfs"
    header: int  # LUKS2 data offset in bytes (0 without LUKS)
    crypt_name: str | None = DM_NAME
    luks_uuid: str = ""
    sparse: bool = False  # allocation mode: full (fallocate) unless the config says sparse

    @property
    def device(self) -> str:
        """The block device the file system is on."""
        return f"/dev/mapper/{self.crypt_name}" if self.crypt_name else self.loop

    @property
    def state_dir(self) -> Path:
        return self.image.parent


@dataclass(frozen=True)
class Sizes:
    """The four layers' sizes in bytes, bottom up (see the invariant above)."""

    file: int
    loop: int
    device: int  # dm-crypt (or the loop device itself without LUKS)
    fs: int  # what the file system's superblock says it spans

    def problems(self, header: int) -> list[str]:
        """Violations of the invariant: what a crash can never leave behind (pure)."""
        found = []
        if self.device > self.file - header:
            found.append(f"mapping {self.device} larger than the file's data {self.file - header}")
        if self.device > self.loop - header:
            found.append(f"mapping {self.device} larger than the loop's data {self.loop - header}")
        if self.fs > self.device:
            found.append(f"file system {self.fs} larger than its device {self.device}")
        return found


def find_volume(
    state_dir: Path, *, sparse: bool = False, crypt_name: str | None = DM_NAME
) -> Volume:
    """The running system's encrypted.img under state_dir (/state or /run/pystate/state).

    The loop device is the one under /dev/mapper/<crypt_name> (or, with crypt_name None,
    the one mounted at <state>/encrypted), and must be backed by that very file.
    """
    image = state_dir / IMAGE
    mountpoint = state_dir / MOUNT_DIR
    if not image.is_file() or image.is_symlink():
        raise ResizeError(f"{image} is not there: nothing to resize")
    mounted = mount_entry(mountpoint)
    if mounted is None or mounted[1] not in ("ext4", "btrfs"):
        raise ResizeError(f"{mountpoint} is not a mounted ext4 or btrfs file system")
    if crypt_name is not None:
        dm_path = Path(f"/dev/mapper/{crypt_name}")
        if not dm_path.exists():
            raise ResizeError(f"{dm_path} is not open: encrypted.img was not unlocked at boot")
        dm = block_name(dm_path)  # dm-0
        slaves = sorted(os.listdir(f"/sys/block/{dm}/slaves"))
        if len(slaves) != 1 or not slaves[0].startswith("loop"):
            raise ResizeError(f"{dm_path} does not sit on one loop device (found {slaves})")
        loop_name = slaves[0]
    else:
        loop_name = block_name(mounted[0])
        if not loop_name.startswith("loop"):
            raise ResizeError(f"{mountpoint} is mounted from {mounted[0]}, not a loop device")
    loop = f"/dev/{loop_name}"
    backing = Path(f"/sys/block/{loop_name}/loop/backing_file").read_text().strip()
    if not os.path.exists(backing) or not os.path.samefile(backing, image):
        raise ResizeError(f"{loop} is backed by {backing}, not {image}: refusing to resize it")
    header, uuid = 0, ""
    if crypt_name is not None:
        from pystate_initrd.system import (
            luks,  # lazily: the service's hot path never needs it again
        )

        luks_header = luks.read_header(image)
        header, uuid = luks_header.data_offset, luks_header.uuid
    return Volume(
        image=image,
        loop=loop,
        mountpoint=mountpoint,
        fstype=mounted[1],
        header=header,
        crypt_name=crypt_name,
        luks_uuid=uuid,
        sparse=sparse,
    )


def block_name(device: str | Path) -> str:
    """The kernel's name of a block device node (dm-0, loop3), by its device number.

    /dev/mapper/NAME is a node of its own, not a symlink, where libdevmapper made it
    without udev (the initrd): its name says nothing, its number does.
    """
    rdev = os.stat(device).st_rdev
    sys_path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    return os.path.basename(os.path.realpath(sys_path))


def mount_entry(mountpoint: Path) -> tuple[str, str] | None:
    """(source, type) of the file system one sees at mountpoint, from mountinfo."""
    mounts = mountinfo.parse(Path(mountinfo.MOUNTINFO).read_text())
    found = mountinfo.visible_at(mounts, os.path.realpath(mountpoint))
    return (found.source, found.fstype) if found else None


# --- measuring ---------------------------------------------------------------------------


def read_fs_size(device: str, fstype: str) -> int:
    """The file system's size from its superblock (through the page cache: block.read_head)."""
    size = superblock.fs_size(block.read_head(device), fstype)
    if size is None:
        raise ResizeError(f"{device} holds no {fstype} superblock")
    return size


def sizes(vol: Volume) -> Sizes:
    return Sizes(
        file=os.stat(vol.image).st_size,
        loop=block.block_size_bytes(vol.loop),
        device=block.block_size_bytes(vol.device),
        fs=read_fs_size(vol.device, vol.fstype),
    )


def measure(vol: Volume) -> Space:
    """What the policy needs (resize_policy.Space), from two statvfs calls and one stat."""
    from pystate_initrd.formats.resize_policy import space_from_statvfs

    outer = os.statvfs(vol.state_dir)
    inner = os.statvfs(vol.mountpoint)
    st = os.stat(vol.image)
    space = space_from_statvfs(
        outer, inner, image_size=st.st_size, header_size=vol.header, inner_fs=vol.fstype
    )
    if vol.sparse:
        # Holes will take outer space later: they are not room (docs/resize-policy.md).
        holes = max(0, st.st_size - st.st_blocks * 512)
        space = replace(space, outer_free=max(0, space.outer_free - holes))
    return space


# --- the steps ---------------------------------------------------------------------------


@dataclass
class Change:
    """One resize as it happened: what the log and `pystate status` show."""

    action: str  # "grow", "shrink" or "request"
    before: int
    after: int
    steps: list[tuple[str, float]] = field(default_factory=list)  # (name, ms)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    # how crypt-resize swapped the table: "dm-table" (no freeze), "libcryptsetup", "cryptsetup"
    crypt_method: str = ""

    def describe(self) -> str:
        if self.action == "request":
            return (
                f"shrink {human_size(self.before)} -> {human_size(self.after)} requested "
                "for the next boot"
            )
        timing = ", ".join(f"{name} {ms:.0f} ms" for name, ms in self.steps)
        return (
            f"{self.action} {human_size(self.before)} -> {human_size(self.after)} "
            f"in {self.seconds:.2f} s ({timing})"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action,
            "before": self.before,
            "after": self.after,
            "time": round(self.started),
            "seconds": round(self.seconds, 3),
            "steps": {name: round(ms, 1) for name, ms in self.steps},
            **({"crypt_method": self.crypt_method} if self.crypt_method else {}),
        }


@contextlib.contextmanager
def _step(change: Change, name: str, hook: Hook) -> Iterator[None]:
    begin = time.monotonic()
    yield
    change.steps.append((name, (time.monotonic() - begin) * 1000))
    hook(name)


def _open_image(vol: Volume) -> int:
    fd = os.open(vol.image, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ResizeError(f"{vol.image} is not a regular file")
    return fd


def _check_target(vol: Volume, target: int) -> None:
    if target % MIB or target <= vol.header:
        raise ResizeError(f"target size {target} is not a whole MiB above the LUKS header")


def crypt_resize_argv(name: str, size: int | None = None) -> list[str]:
    """cryptsetup resize, to the underlying device's end or to size bytes (pure).

    No key option, no stdin: the mapping holds its key in the dm table
    (``--disable-keyring`` at open), so cryptsetup only reloads the table. A mapping opened
    with the key in the kernel keyring makes cryptsetup ask for a key: it gets none and
    fails, and crypt_resize() says why.
    """
    argv = ["cryptsetup", "resize", "--batch-mode"]
    if size is not None:
        argv += ["--size", str(_mapping_sectors(size))]
    return [*argv, name]


def _mapping_sectors(size: int) -> int:
    if size % FS_BLOCK:
        raise ResizeError(f"mapping size {size} is not a multiple of {FS_BLOCK}")
    return size // SECTOR


def crypt_resize(name: str, size: int | None = None) -> None:
    """Resize the mapping name to size bytes (None: its device's end), without a key.

    libcryptsetup in process (crypt_init_by_name + crypt_resize) when it loads, else
    ``crypt_resize_argv``'s command; system/libcryptsetup.available() decides.
    """
    if not libcryptsetup.available():
        run(crypt_resize_argv(name, size))
        return
    libcryptsetup.resize(name, 0 if size is None else _mapping_sectors(size))


def _crypt_resize(vol: Volume, size: int | None) -> str:
    """The mapping to size bytes, or to its loop device's end: a table reload by ioctl with
    no file-system freeze (devmapper.resize_crypt); crypt_resize() where the ioctls fail (a
    kernel or table pystate does not know), which freezes but works."""
    if vol.crypt_name is None:
        return ""
    try:
        devmapper.resize_crypt(vol.crypt_name, block.block_size_bytes(vol.loop), size=size)
        return "dm-table"
    except (DmTableError, OSError) as exc:
        log = installed_log()
        if log is not None:
            log.warning(f"table reload of {vol.crypt_name} failed ({exc}); crypt_resize")
    try:
        crypt_resize(vol.crypt_name, size)
    except (CommandError, LuksError) as exc:
        raise ResizeError(
            f"resizing the dm-crypt mapping {vol.crypt_name} failed: {exc}",
            hint="was it opened with its key in the kernel keyring? pystate opens it with "
            "--disable-keyring so that no key is needed (docs/resize.md)",
        ) from None
    return "libcryptsetup" if libcryptsetup.available() else "cryptsetup"


def fs_grow_argv(vol: Volume) -> list[str]:
    if vol.fstype == "btrfs":
        return ["btrfs", "filesystem", "resize", "max", str(vol.mountpoint)]
    return ["resize2fs", vol.device]  # mounted: online, to the device's size


def fs_shrink_argv(vol: Volume, fs_size: int) -> list[str]:
    if vol.fstype != "btrfs":
        raise ResizeError(f"{vol.fstype} cannot shrink online; write a request instead")
    return ["btrfs", "filesystem", "resize", str(fs_size), str(vol.mountpoint)]


def grow(vol: Volume, target: int, *, hook: Hook = no_hook) -> Change:
    """Grow encrypted.img and everything on it to target bytes, online."""
    _check_target(vol, target)
    begin = time.monotonic()
    fd = _open_image(vol)
    try:
        before = os.fstat(fd).st_size
        if target <= before:
            raise ResizeError(f"grow to {human_size(target)}: the image is already {before} B")
        change = Change("grow", before, target)
        with _step(change, "allocate", hook):
            try:
                if vol.sparse:
                    os.ftruncate(fd, target)
                else:
                    # Mode 0 allocates every block and moves EOF: no hole for the inner fs
                    # to hit ENOSPC in later (SPEC §5).
                    block.fallocate(fd, 0, before, target - before)
                os.fsync(fd)  # the new size is durable before any layer above uses it
            except OSError as exc:
                # Blocks allocated beyond the old end are given back; the size is unchanged.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
                    os.fsync(fd)
                raise ResizeError(
                    f"allocating {human_size(target - before)} for {vol.image} failed: "
                    f"{exc.strerror}; nothing was changed"
                ) from None
    finally:
        os.close(fd)
    finish_grow(vol, change, hook)
    change.seconds = time.monotonic() - begin
    return change


def finish_grow(vol: Volume, change: Change, hook: Hook = no_hook) -> None:
    """Steps 2-4 of a grow: each layer takes the size of the one below it."""
    with _step(change, "loop-capacity", hook):
        loopdev.loop_set_capacity(vol.loop)
    with _step(change, "crypt-resize", hook):
        change.crypt_method = _crypt_resize(vol, None)
    with _step(change, "fs-grow", hook):
        try:
            run(fs_grow_argv(vol))
        except CommandError as exc:
            raise ResizeError(
                f"growing the {vol.fstype} file system on {vol.device} failed: {exc}",
                hint="the image is larger and the file system intact; the service retries",
            ) from None


def shrink_online(vol: Volume, target: int, *, hook: Hook = no_hook) -> Change:
    """Shrink a btrfs image to target bytes, online; ResizeError leaves it consistent."""
    _check_target(vol, target)
    begin = time.monotonic()
    before = os.stat(vol.image).st_size
    if target >= before:
        raise ResizeError(f"shrink to {human_size(target)}: the image is already {before} B")
    fs_size = target - vol.header
    change = Change("shrink", before, target)
    with _step(change, "fs-shrink", hook):
        try:
            run(fs_shrink_argv(vol, fs_size))
        except CommandError as exc:
            raise ResizeError(
                f"btrfs could not shrink to {human_size(fs_size)}: {exc}; nothing was changed"
            ) from None
    with _step(change, "sync", hook):
        # The smaller file system must be what is on disk before anything below it shrinks.
        os.sync()  # syncfs(2) is not in os; sync(2) covers the inner and the outer fs
        now = read_fs_size(vol.device, vol.fstype)
        if now > fs_size:
            raise ResizeError(
                f"btrfs still spans {now} B after shrinking to {fs_size}; not going on"
            )
    with _step(change, "crypt-resize", hook):
        change.crypt_method = _crypt_resize(vol, fs_size)
    fd = _open_image(vol)
    try:
        with _step(change, "truncate", hook):
            os.ftruncate(fd, target)
            os.fsync(fd)
    finally:
        os.close(fd)
    with _step(change, "loop-capacity", hook):
        loopdev.loop_set_capacity(vol.loop)
    change.seconds = time.monotonic() - begin
    return change


def reconcile(vol: Volume, *, hook: Hook = no_hook) -> Change | None:
    """After a crash: finish an interrupted grow or undo an interrupted shrink.

    Whatever step was cut off, the invariant holds and every layer is at most the size of
    the one below it; this makes each layer fill the one below (loop capacity, mapping,
    file system), which is the end state of a grow and the start state of a shrink.
    None when nothing was left over.
    """
    now = sizes(vol)
    if now.problems(vol.header):
        raise ResizeError(
            f"the layers of {vol.image} are inconsistent: {'; '.join(now.problems(vol.header))}",
            hint="not resizing; reboot, the initrd sets them up afresh",
        )
    if (
        now.loop == now.file
        and now.device == now.loop - vol.header
        and now.fs + FINISH_SLACK > now.device
    ):
        return None
    change = Change("finish", now.fs + vol.header, now.file)
    begin = time.monotonic()
    finish_grow(vol, change, hook)
    change.seconds = time.monotonic() - begin
    return change
