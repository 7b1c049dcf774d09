"""The resize policy (SPEC §7): how large encrypted.img should be, given the free space.

Pure logic, no I/O: ``decide(space, params)`` takes the sizes the service read with statvfs
and stat and returns a ``Decision`` — grow, shrink or none, the target image size, the
reasons (one short line per rule that fired) and the numbers behind it for ``pystate
status``. All arithmetic is in whole bytes.

The rules, in the order decide() applies them (docs/resize-policy.md has worked examples):

- reserve = max(reserve_min, reserve_ppm of the outer size), rounded up.
- pool = (outer free - reserve, or 0 when the outer is below its reserve) + inner free.
  A grow moves bytes from one term to the other, so it leaves the pool, the shares and the
  buffer unchanged: that is what makes a decision idempotent. The plain area eating into the
  reserve does not shrink the pool below the image's own free space (it is not charged to
  the encrypted area), so with equal weights filling /home never squeezes the image.
- encrypted share = pool * w_encrypted / (w_plain + w_encrypted), rounded up; the plain share
  is the rest.
- buffer = min(max(buffer_min, buffer_percent of used), encrypted share).
- margin = max(margin_min, margin_percent of used);
  floor = LUKS header + the file system's own overhead + used + margin.
- grow when 2 * free < buffer (or the image is below the minimum size): to
  max(image + buffer - free rounded down, floor, minimum size), capped at
  image + outer free - reserve rounded down;
  shrink when free > 2 * buffer: to max(image - free + buffer rounded up, floor, minimum size).
- a change under step_percent of the image is skipped, except a grow while the inner free
  space is below the margin (or the image below the minimum size): running the encrypted file
  system full is worse than a small resize.
- inconsistent inputs (negative, free > size, used + free > size, a file system larger than
  its image, ...) give ``none`` with the reason; decide() never raises for any ints.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from pystate_initrd.errors import PystateError

if TYPE_CHECKING:
    import os

    from pystate_initrd.config import Config

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
ALIGN = MIB  # image sizes are multiples of this
FS_BLOCK = 4096  # the inner file system's size (image - header) is a multiple of this
PPM = 1_000_000
BTRFS_MIN_FS = 256 * MIB  # the smallest size btrfs resizes to


class PolicyError(PystateError):
    """Resize parameters that cannot work (a zero weight, a percentage over 100, ...)."""


class Action(StrEnum):
    NONE = "none"
    GROW = "grow"
    SHRINK = "shrink"


@dataclass(frozen=True)
class Space:
    """What the service measured, in bytes. See space_from_statvfs() for where each comes from.

    outer_size: the outer file system's size (f_blocks * f_frsize).
    outer_free: its free space for an unprivileged writer (f_bavail * f_frsize).
    image_size: encrypted.img's size (st_size).
    header_size: the LUKS2 header, i.e. the data offset; the image is header + inner fs.
    inner_size / inner_used / inner_free: the inner file system's statvfs
        (f_blocks, f_blocks - f_bfree, min(f_bavail, f_bfree), times f_frsize).
    inner_fs: "ext4" or "btrfs" (ext4 shrinks offline only).
    """

    outer_size: int
    outer_free: int
    image_size: int
    header_size: int
    inner_size: int
    inner_used: int
    inner_free: int
    inner_fs: str = "ext4"


def space_from_statvfs(
    outer: os.statvfs_result,
    inner: os.statvfs_result,
    *,
    image_size: int,
    header_size: int,
    inner_fs: str,
) -> Space:
    """A Space from the two statvfs results, counting free space as pystate does.

    Free space is f_bavail, what a writer without CAP_SYS_RESOURCE can use, not f_bfree: the
    plain area's users (/home) can only reach f_bavail, so the split by weight must count the
    same thing on both sides; f_bfree would let the service eat ext4's root reservation on
    top of pystate's own reserve; and on btrfs f_bfree is raw device space while f_bavail
    accounts for the data profile (DUP, RAID1) an image file's blocks are written with.
    Inside the image, used is f_blocks - f_bfree (what the files really take) and free is
    min(f_bavail, f_bfree), so used + free never exceeds the size.
    """
    outer_unit, inner_unit = outer.f_frsize, inner.f_frsize
    return Space(
        outer_size=outer.f_blocks * outer_unit,
        outer_free=outer.f_bavail * outer_unit,
        image_size=image_size,
        header_size=header_size,
        inner_size=inner.f_blocks * inner_unit,
        inner_used=(inner.f_blocks - inner.f_bfree) * inner_unit,
        inner_free=min(inner.f_bavail, inner.f_bfree) * inner_unit,
        inner_fs=inner_fs,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PolicyParams:
    """The knobs of SPEC §7. Defaults are the SPEC's; params_from_config() maps pystate.conf."""

    weights: tuple[int, int] = (50, 50)  # plain : encrypted
    reserve_ppm: int = 10_000  # of the outer size, in parts per million (1 %)
    reserve_min: int = 256 * MIB
    min_image_size: int = 256 * MIB
    buffer_min: int = GIB
    buffer_percent: int = 10  # of the inner used space
    margin_min: int = 64 * MIB
    margin_percent: int = 2  # of the inner used space
    step_percent: int = 5  # of the image size

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise PolicyError(f"resize policy: {what}")

        weights = self.weights
        check(
            isinstance(weights, tuple)
            and len(weights) == 2
            and all(_is_int(w) and w >= 1 for w in weights),
            f"weights {weights!r} must be two whole numbers of at least 1 (plain, encrypted)",
        )
        for name in ("reserve_min", "min_image_size", "buffer_min", "margin_min"):
            value = getattr(self, name)
            check(_is_int(value) and value >= 0, f"{name} {value!r} is not a size in bytes")
        for name in ("buffer_percent", "margin_percent", "step_percent"):
            value = getattr(self, name)
            check(_is_int(value) and 0 <= value <= 100, f"{name} {value!r} is not 0-100")
        check(
            _is_int(self.reserve_ppm) and 0 <= self.reserve_ppm <= PPM,
            f"reserve_ppm {self.reserve_ppm!r} is not 0-{PPM}",
        )
        # Without a margin a shrink could leave a completely full (or empty-sized) file system.
        check(self.margin_min >= FS_BLOCK, f"margin_min {self.margin_min} is under {FS_BLOCK}")


DEFAULT_PARAMS = PolicyParams()


def params_from_config(cfg: Config) -> PolicyParams:
    """The policy's parameters from the trusted configuration (SPEC §9, [resize] and [image])."""
    return PolicyParams(
        weights=cfg.weights,
        reserve_ppm=round(cfg.reserve_percent * (PPM // 100)),
        reserve_min=cfg.reserve_min_bytes,
        min_image_size=cfg.min_image_size,
    )


@dataclass(frozen=True)
class Decision:
    """What to do with encrypted.img, why, and the numbers behind it (all bytes, never < 0).

    target is the image size to reach (the current size for NONE); fs_size = target - header
    is the size of the dm-crypt device and of the inner file system after the change.
    offline: a shrink of ext4, which the initrd carries out at the next boot (the service
    writes a request); grows, and btrfs shrinks, are done online.
    """

    action: Action
    current: int
    target: int
    fs_size: int
    offline: bool
    reasons: tuple[str, ...]
    reserve: int  # of the outer file system
    room: int  # outer free space above the reserve: the most a grow can take
    pool: int
    plain_share: int
    encrypted_share: int
    buffer: int
    margin: int
    floor: int  # header + overhead + used + margin: no shrink goes below this

    @property
    def delta(self) -> int:
        return self.target - self.current

    def describe(self) -> str:
        """One line for the log and `pystate status`."""
        head = (
            "no change"
            if self.action is Action.NONE
            else f"{self.action} {human_size(self.current)} -> {human_size(self.target)}"
            + (" (offline, at the next boot)" if self.offline else "")
        )
        return f"{head}: {'; '.join(self.reasons)}"


def human_size(size: int) -> str:
    """``300 MiB``, ``2.1 GiB``: binary units, one decimal at most, integer arithmetic."""
    if size < 0:
        return "-" + human_size(-size)
    unit, name = 1, "B"
    for factor, label in ((1 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), (GIB, "GiB"),
                          (MIB, "MiB"), (KIB, "KiB")):  # fmt: skip
        if size >= factor:
            unit, name = factor, label
            break
    tenths = (size * 10 + unit // 2) // unit
    whole, tenth = divmod(tenths, 10)
    return f"{whole} {name}" if tenth == 0 else f"{whole}.{tenth} {name}"


def _down(size: int) -> int:
    return size - size % ALIGN


def _up(size: int) -> int:
    return _down(size + ALIGN - 1)


def _percent(part: int, whole: int) -> str:
    """part/whole as a percentage with one decimal, rounded down (``3.4``)."""
    tenths = part * 1000 // whole if whole > 0 else 0
    whole_percent, tenth = divmod(tenths, 10)
    return f"{whole_percent}" if tenth == 0 else f"{whole_percent}.{tenth}"


def _inconsistencies(space: Space) -> list[str]:
    """What makes these sizes impossible for a real system; empty when they are consistent."""
    s = space
    values = {
        "outer size": s.outer_size,
        "outer free": s.outer_free,
        "image size": s.image_size,
        "header size": s.header_size,
        "inner size": s.inner_size,
        "inner used": s.inner_used,
        "inner free": s.inner_free,
    }
    problems = [f"{name} {value} is negative" for name, value in values.items() if value < 0]
    if problems:
        return problems
    size = human_size
    if s.outer_free > s.outer_size:
        problems.append(
            f"outer free {size(s.outer_free)} exceeds the outer size {size(s.outer_size)}"
        )
    if s.image_size > s.outer_size:
        problems.append(f"image {size(s.image_size)} exceeds the outer size {size(s.outer_size)}")
    if s.header_size % FS_BLOCK:
        problems.append(f"LUKS header size {s.header_size} is not a multiple of {FS_BLOCK}")
    if s.header_size >= s.image_size:
        problems.append(
            f"LUKS header {size(s.header_size)} leaves no room in the image {size(s.image_size)}"
        )
    elif s.inner_size > s.image_size - s.header_size:
        # The one state SPEC §7 rules out: finish or undo the interrupted resize first.
        problems.append(
            f"inner file system {size(s.inner_size)} is larger than the image holds "
            f"({size(s.image_size - s.header_size)})"
        )
    if s.inner_size == 0:
        problems.append("inner file system size is 0")
    if s.inner_used + s.inner_free > s.inner_size:
        problems.append(
            f"inner used {size(s.inner_used)} + free {size(s.inner_free)} exceed its size "
            f"{size(s.inner_size)}"
        )
    return problems


def minimum_image_size(space: Space, params: PolicyParams = DEFAULT_PARAMS) -> int:
    """The smallest image the policy makes: the configured minimum, and for btrfs the header
    plus 256 MiB, since btrfs refuses to be resized below that (btrfs_ioctl_resize: EINVAL)."""
    if space.inner_fs == "btrfs":
        return max(params.min_image_size, space.header_size + BTRFS_MIN_FS)
    return params.min_image_size


def decide(space: Space, params: PolicyParams = DEFAULT_PARAMS) -> Decision:
    """The resize decision for these sizes (SPEC §7). Deterministic; never raises."""
    p = params
    # The numbers, from inputs clamped at 0 so that even for nonsense none of them is negative.
    outer_size, outer_free, image, header, inner_size, used, free = (
        max(0, v)
        for v in (
            space.outer_size,
            space.outer_free,
            space.image_size,
            space.header_size,
            space.inner_size,
            space.inner_used,
            space.inner_free,
        )
    )
    reserve = max(p.reserve_min, -(-outer_size * p.reserve_ppm // PPM))
    room = max(0, outer_free - reserve)
    pool = room + free
    w_plain, w_encrypted = p.weights
    # Rounded up: with equal weights twice the share is then never less than the pool, so the
    # share alone never asks a 50:50 image to shrink over one odd byte.
    encrypted_share = -(-pool * w_encrypted // (w_plain + w_encrypted))
    wanted = max(p.buffer_min, used * p.buffer_percent // 100)
    buffer = min(wanted, encrypted_share)
    margin = max(p.margin_min, used * p.margin_percent // 100)
    overhead = max(0, image - header - inner_size)  # journal, inode tables: not in f_blocks
    floor = header + overhead + used + margin
    reasons: list[str] = []
    size = human_size

    def result(action: Action, target: int) -> Decision:
        return Decision(
            action=action,
            current=image,
            target=target,
            fs_size=max(0, target - header),
            offline=action is Action.SHRINK and space.inner_fs != "btrfs",
            reasons=tuple(reasons),
            reserve=reserve,
            room=room,
            pool=pool,
            plain_share=pool - encrypted_share,
            encrypted_share=encrypted_share,
            buffer=buffer,
            margin=margin,
            floor=floor,
        )

    problems = _inconsistencies(space)
    if problems:
        reasons.append(f"inconsistent sizes, not resizing: {'; '.join(problems)}")
        return result(Action.NONE, image)

    if buffer < wanted:
        reasons.append(
            f"buffer {size(wanted)} capped by the encrypted share {size(encrypted_share)} "
            f"of the pool {size(pool)}"
        )
    min_size = minimum_image_size(space, p)
    lift = max(_up(floor), _up(min_size))  # the hard minimums, as aligned sizes

    def skipped_by_step(target: int, exempt: str | None) -> bool:
        change = abs(target - image)
        if change * 100 >= image * p.step_percent:
            return False
        if exempt:
            reasons.append(
                f"change of {_percent(change, image)} % under the {p.step_percent} % step, "
                f"made anyway: {exempt}"
            )
            return False
        reasons.append(
            f"change of {_percent(change, image)} % under the {p.step_percent} % step: skipped"
        )
        return True

    if 2 * free < buffer or image < p.min_image_size:
        if 2 * free < buffer:
            reasons.append(f"free {size(free)} below half the buffer {size(buffer)}")
        if image < p.min_image_size:
            reasons.append(f"image {size(image)} below the minimum {size(p.min_image_size)}")
        by_buffer = _down(image + buffer - free)
        target = max(by_buffer, lift)
        if target > by_buffer:
            reasons.append(
                f"raised to used + margin {size(_up(floor))}"
                if _up(floor) >= _up(min_size)
                else f"raised to the minimum image size {size(_up(min_size))}"
            )
        cap = _down(image + room)
        if target > cap:
            target = cap
            if cap <= image:
                reasons.append(
                    f"outer free {size(outer_free)} leaves nothing above the reserve "
                    f"{size(reserve)}: cannot grow"
                )
                return result(Action.NONE, image)
            reasons.append(f"outer reserve {size(reserve)} leaves room for {size(room)}")
        if target <= image:
            reasons.append("the change rounds to less than 1 MiB: nothing to do")
            return result(Action.NONE, image)
        exempt = None
        if free < margin:
            exempt = f"free {size(free)} is below the margin {size(margin)}"
        elif image < p.min_image_size:
            exempt = "the image is below the minimum size"
        if skipped_by_step(target, exempt):
            return result(Action.NONE, image)
        return result(Action.GROW, target)

    if free > 2 * buffer:
        reasons.append(f"free {size(free)} above twice the buffer {size(buffer)}")
        by_buffer = _up(image - free + buffer)
        target = max(by_buffer, lift)
        if target >= image:
            reasons.append(
                f"image already at or below used + margin {size(_up(floor))}: not shrinking"
                if _up(floor) >= _up(min_size)
                else f"image already at the minimum size {size(min_size)}: not shrinking"
            )
            return result(Action.NONE, image)
        if target > by_buffer:
            reasons.append(
                f"held at used + margin {size(_up(floor))}"
                if _up(floor) >= _up(min_size)
                else f"held at the minimum image size {size(_up(min_size))}"
            )
        if skipped_by_step(target, None):
            return result(Action.NONE, image)
        reasons.append(
            "btrfs shrinks online"
            if space.inner_fs == "btrfs"
            else f"{space.inner_fs} shrinks offline: the initrd does it at the next boot"
        )
        return result(Action.SHRINK, target)

    reasons.append(
        f"free {size(free)} between half and twice the buffer {size(buffer)}: nothing to do"
    )
    return result(Action.NONE, image)
