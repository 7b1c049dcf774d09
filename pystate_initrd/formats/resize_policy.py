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
- the plain area's buffer (SPEC §11.2), the same rule on the other side:
  plain used = outer size - outer free - image (everything on the outer fs but the image);
  plain buffer = min(max(buffer_min, buffer_percent of plain used), plain share).
- grow when 2 * free < buffer (or the image is below the minimum size): to
  max(image + buffer - free rounded down, floor, minimum size), capped at
  image + outer free - reserve rounded down;
  shrink when free > 2 * buffer, or (SPEC §11.2) when 2 * outer free < plain buffer while
  free > buffer: to max(image - free + buffer rounded up, floor, minimum size).
- a change under step_percent of the image is skipped, except a grow while the inner free
  space is below the margin (or the image below the minimum size), and a shrink while the
  outer free space is below the plain area's margin (max(margin_min, margin_percent of plain
  used)): running either file system full is worse than a small resize.
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
    """The knobs of SPEC §7. Defaults are the SPEC's; volume/policy.py maps pystate.conf."""

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
    plain_used: int  # outer size - outer free - image: everything on /state but the image
    plain_buffer: int  # min(max(buffer_min, % of plain_used), plain_share) (SPEC §11.2)

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


def reserve(outer_size: int, params: PolicyParams = DEFAULT_PARAMS) -> int:
    """The outer file system's reserve: max(reserve_min, reserve_ppm of its size, rounded up)."""
    return max(params.reserve_min, -(-max(0, outer_size) * params.reserve_ppm // PPM))


def encrypted_share(pool: int, params: PolicyParams = DEFAULT_PARAMS) -> int:
    """The encrypted area's weighted share of the pool.

    Rounded up: with equal weights twice the share is then never less than the pool, so the
    share alone never asks a 50:50 image to shrink over one odd byte.
    """
    w_plain, w_encrypted = params.weights
    return -(-pool * w_encrypted // (w_plain + w_encrypted))


def wanted_buffer(used: int, params: PolicyParams = DEFAULT_PARAMS) -> int:
    """The free space an area should keep before its share caps it: max(buffer_min, %).

    The same rule for both areas (SPEC §7, §11.2): used is the image's inner used space, or
    the plain area's (plain_used()).
    """
    return max(params.buffer_min, used * params.buffer_percent // 100)


def plain_used(outer_size: int, outer_free: int, image_size: int) -> int:
    """The plain area's used space: everything on the outer file system but the image.

    That includes the outer file system's own blocks that statfs counts in its size but not
    as available (ext4's root reservation): the plain area cannot use them either.
    """
    return max(0, max(0, outer_size) - max(0, outer_free) - max(0, image_size))


def margin(used: int, params: PolicyParams = DEFAULT_PARAMS) -> int:
    """Free space no shrink takes from the inner file system: max(margin_min, % of used)."""
    return max(params.margin_min, used * params.margin_percent // 100)


def initial_size(
    outer_size: int, outer_free: int, header_size: int, params: PolicyParams = DEFAULT_PARAMS
) -> int:
    """The first size of encrypted.img (SPEC §6, §11.5): header + the buffer of an empty image.

    With nothing used yet the buffer is min(buffer_min, encrypted share of the pool), the
    pool being the outer free space above the reserve; at least min_image_size, at most the
    room above the reserve. PolicyError when the room is below the minimum.
    """
    kept = reserve(outer_size, params)
    room = max(0, outer_free - kept)
    buffer = min(wanted_buffer(0, params), encrypted_share(room, params))
    size = _up(max(params.min_image_size, header_size + buffer))
    cap = _down(room)
    if cap < params.min_image_size:
        raise PolicyError(
            f"the state partition has {human_size(outer_free)} free; the encrypted image needs "
            f"{human_size(params.min_image_size)} above the reserve of {human_size(kept)}",
            hint="make the state partition larger or free space on it",
        )
    return min(size, cap)


@dataclass(frozen=True)
class _Figures:
    """The numbers every rule of decide() works with, from inputs clamped at 0."""

    image: int
    header: int
    used: int
    free: int
    outer_free: int
    reserve: int
    room: int  # outer free space above the reserve: the most a grow can take
    pool: int
    encrypted_share: int
    wanted: int  # the buffer before the share caps it
    buffer: int
    margin: int
    floor: int  # header + overhead + used + margin
    min_size: int  # minimum_image_size()
    plain_used: int
    plain_share: int
    plain_wanted: int  # the plain buffer before the plain share caps it
    plain_buffer: int
    plain_margin: int

    @property
    def plain_starved(self) -> bool:
        """SPEC §11.2: the outer free space below half the plain buffer while the image
        holds more free space than its own buffer."""
        return 2 * self.outer_free < self.plain_buffer and self.free > self.buffer

    @property
    def lift(self) -> int:
        """The hard minimums, as an aligned size."""
        return max(_up(self.floor), _up(self.min_size))

    @property
    def floor_wins(self) -> bool:
        """Whether used + margin, not the minimum image size, is the binding minimum."""
        return _up(self.floor) >= _up(self.min_size)


def _figures(space: Space, p: PolicyParams) -> _Figures:
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
    kept = reserve(outer_size, p)
    room = max(0, outer_free - kept)
    pool = room + free
    share = encrypted_share(pool, p)
    wanted = wanted_buffer(used, p)
    kept_margin = margin(used, p)
    overhead = max(0, image - header - inner_size)  # journal, inode tables: not in f_blocks
    plain = plain_used(outer_size, outer_free, image)
    plain_wanted = wanted_buffer(plain, p)
    return _Figures(
        image=image,
        header=header,
        used=used,
        free=free,
        outer_free=outer_free,
        reserve=kept,
        room=room,
        pool=pool,
        encrypted_share=share,
        wanted=wanted,
        buffer=min(wanted, share),
        margin=kept_margin,
        floor=header + overhead + used + kept_margin,
        min_size=minimum_image_size(space, p),
        plain_used=plain,
        plain_share=pool - share,
        plain_wanted=plain_wanted,
        plain_buffer=min(plain_wanted, pool - share),
        plain_margin=margin(plain, p),
    )


def decide(space: Space, params: PolicyParams = DEFAULT_PARAMS) -> Decision:
    """The resize decision for these sizes (SPEC §7, §11.2). Deterministic; never raises."""
    f = _figures(space, params)
    reasons: list[str] = []
    problems = _inconsistencies(space)
    if problems:
        reasons.append(f"inconsistent sizes, not resizing: {'; '.join(problems)}")
        action, target = Action.NONE, f.image
    else:
        if f.buffer < f.wanted:
            reasons.append(
                f"buffer {human_size(f.wanted)} capped by the encrypted share "
                f"{human_size(f.encrypted_share)} of the pool {human_size(f.pool)}"
            )
        if 2 * f.free < f.buffer or f.image < params.min_image_size:
            action, target = _grow(f, params, reasons)
        elif f.free > 2 * f.buffer or f.plain_starved:
            action, target = _shrink(f, params, space.inner_fs, reasons)
        else:
            reasons.append(
                f"free {human_size(f.free)} between half and twice the buffer "
                f"{human_size(f.buffer)}: nothing to do"
            )
            action, target = Action.NONE, f.image
    return Decision(
        action=action,
        current=f.image,
        target=target,
        fs_size=max(0, target - f.header),
        offline=action is Action.SHRINK and space.inner_fs != "btrfs",
        reasons=tuple(reasons),
        reserve=f.reserve,
        room=f.room,
        pool=f.pool,
        plain_share=f.pool - f.encrypted_share,
        encrypted_share=f.encrypted_share,
        buffer=f.buffer,
        margin=f.margin,
        floor=f.floor,
        plain_used=f.plain_used,
        plain_buffer=f.plain_buffer,
    )


def _skipped_by_step(
    f: _Figures, p: PolicyParams, target: int, exempt: str | None, reasons: list[str]
) -> bool:
    """Whether a change under step_percent of the image is skipped (unless exempt)."""
    change = abs(target - f.image)
    if change * 100 >= f.image * p.step_percent:
        return False
    under = f"change of {_percent(change, f.image)} % under the {p.step_percent} % step"
    if exempt:
        reasons.append(f"{under}, made anyway: {exempt}")
        return False
    reasons.append(f"{under}: skipped")
    return True


def _grow(f: _Figures, p: PolicyParams, reasons: list[str]) -> tuple[Action, int]:
    """Free space below half the buffer (or an image below the minimum): grow to the buffer,
    at least to the hard minimums, at most to what the outer reserve leaves."""
    size = human_size
    if 2 * f.free < f.buffer:
        reasons.append(f"free {size(f.free)} below half the buffer {size(f.buffer)}")
    if f.image < p.min_image_size:
        reasons.append(f"image {size(f.image)} below the minimum {size(p.min_image_size)}")
    by_buffer = _down(f.image + f.buffer - f.free)
    target = max(by_buffer, f.lift)
    if target > by_buffer:
        reasons.append(
            f"raised to used + margin {size(_up(f.floor))}"
            if f.floor_wins
            else f"raised to the minimum image size {size(_up(f.min_size))}"
        )
    cap = _down(f.image + f.room)
    if target > cap:
        target = cap
        if cap <= f.image:
            reasons.append(
                f"outer free {size(f.outer_free)} leaves nothing above the reserve "
                f"{size(f.reserve)}: cannot grow"
            )
            return Action.NONE, f.image
        reasons.append(f"outer reserve {size(f.reserve)} leaves room for {size(f.room)}")
    if target <= f.image:
        reasons.append("the change rounds to less than 1 MiB: nothing to do")
        return Action.NONE, f.image
    exempt = None
    if f.free < f.margin:
        exempt = f"free {size(f.free)} is below the margin {size(f.margin)}"
    elif f.image < p.min_image_size:
        exempt = "the image is below the minimum size"
    if _skipped_by_step(f, p, target, exempt, reasons):
        return Action.NONE, f.image
    return Action.GROW, target


def _shrink(f: _Figures, p: PolicyParams, inner_fs: str, reasons: list[str]) -> tuple[Action, int]:
    """Free space above twice the buffer, or the plain area starved (SPEC §11.2): shrink to
    the buffer, never below the minimums."""
    size = human_size
    if f.free > 2 * f.buffer:
        reasons.append(f"free {size(f.free)} above twice the buffer {size(f.buffer)}")
    if f.plain_starved:
        capped = (
            f" (capped by the plain share {size(f.plain_share)})"
            if f.plain_buffer < f.plain_wanted
            else ""
        )
        reasons.append(
            f"outer free {size(f.outer_free)} below half the plain buffer "
            f"{size(f.plain_buffer)}{capped} while the image holds {size(f.free)} free, more "
            f"than its buffer {size(f.buffer)}: giving back the excess"
        )
    by_buffer = _up(f.image - f.free + f.buffer)
    target = max(by_buffer, f.lift)
    if target >= f.image:
        if by_buffer >= f.image:
            reasons.append("the change rounds to less than 1 MiB: nothing to do")
        else:
            reasons.append(
                f"image already at or below used + margin {size(_up(f.floor))}: not shrinking"
                if f.floor_wins
                else f"image already at the minimum size {size(f.min_size)}: not shrinking"
            )
        return Action.NONE, f.image
    if target > by_buffer:
        reasons.append(
            f"held at used + margin {size(_up(f.floor))}"
            if f.floor_wins
            else f"held at the minimum image size {size(_up(f.min_size))}"
        )
    exempt = None
    if f.plain_starved and f.outer_free < f.plain_margin:
        exempt = f"outer free {size(f.outer_free)} is below the plain margin {size(f.plain_margin)}"
    if _skipped_by_step(f, p, target, exempt, reasons):
        return Action.NONE, f.image
    reasons.append(
        "btrfs shrinks online"
        if inner_fs == "btrfs"
        else f"{inner_fs} shrinks offline: the initrd does it at the next boot"
    )
    return Action.SHRINK, target
