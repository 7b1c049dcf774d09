"""The mount plan (SPEC §4): which state entries go where, in which order, and which not.

Pure: plan_entries() turns the entries of the two areas into an ordered list of mounts
and a list of rejections with reasons; initrd/state_tree.py lists the directories (one
os.scandir per area; no symlink is ever followed) and calls it.

Nothing is silently dropped: an entry is mounted, reserved (SPEC §3: never mapped and
not worth a report), or rejected with a reason. The plain area is writable by anyone
with the disk in hand, so its names are hostile input: every check is on the name as
found, and a plain entry can only ever reach a target on the trusted allowlist.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import names
from pystate_initrd.formats.escape import NAME_MAX, EscapeError, escape_path, unescape_path


class PlanError(PystateError):
    """A state directory could not be read."""


class Area(StrEnum):
    PLAIN = "plain"
    ENCRYPTED = "encrypted"


class MountMode(StrEnum):
    BIND = "bind"
    OVERLAY = "overlay"


class EntryKind(StrEnum):
    DIR = "dir"
    SYMLINK = "symlink"
    FILE = "file"
    OTHER = "other"


@dataclass(frozen=True)
class Entry:
    """One name found in an area's directory, as it is on disk (symlinks not followed).

    name is as os.listdir gives it: bytes that are not UTF-8 appear as surrogate escapes.
    """

    area: Area
    name: str
    kind: EntryKind
    source: str

    def __post_init__(self) -> None:
        # Plain strings ("plain", "dir") become the enums, so identity checks below hold.
        object.__setattr__(self, "area", Area(self.area))
        object.__setattr__(self, "kind", EntryKind(self.kind))


@dataclass(frozen=True)
class Mount:
    area: Area
    name: str
    source: str  # absolute path of the entry's directory
    target: str  # absolute path in the booted system, e.g. "/home"
    mode: MountMode
    options: tuple[str, ...]  # e.g. ("nosuid", "nodev") for /home


@dataclass(frozen=True)
class Rejection:
    area: Area
    name: str
    reason: str


@dataclass(frozen=True)
class MountPlan:
    mounts: tuple[Mount, ...]
    rejected: tuple[Rejection, ...]

    def to_json(self) -> dict[str, object]:
        """The plan for --json and boot.json; bytes that are not UTF-8 shown as \\xNN."""
        return {
            "mounts": [
                {
                    "area": str(m.area),
                    "name": m.name,
                    "source": _printable(m.source),
                    "target": m.target,
                    "mode": str(m.mode),
                    "options": list(m.options),
                }
                for m in self.mounts
            ],
            "rejected": [
                {"area": str(r.area), "name": _printable(r.name), "reason": r.reason}
                for r in self.rejected
            ],
        }


# SPEC §3: names with a meaning of their own in each area.
_RESERVED: Mapping[Area, frozenset[str]] = MappingProxyType(
    {
        Area.PLAIN: names.RESERVED_PLAIN,
        Area.ENCRYPTED: names.RESERVED_ENCRYPTED,
    }
)

# SPEC §4: never a target, nor anything below (config.py refuses the same, via target_refusal).
FORBIDDEN_PREFIXES = (
    "/usr",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/boot",
    "/efi",
    "/state",
    "/sysroot",
)
# The targets of reserved names (SPEC §4).
RESERVED_TARGETS = frozenset("/" + name for name in names.RESERVED_PLAIN)

# Mount options by target (SPEC §4); any other target keeps what the image has.
_OPTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({"/home": ("nosuid", "nodev")})

NO_MODES: Mapping[str, MountMode] = MappingProxyType({})

_KIND_REASONS = {
    EntryKind.SYMLINK: "is a symbolic link",
    EntryKind.FILE: "is a regular file, not a directory",
    EntryKind.OTHER: "is not a directory",
}


def is_reserved(area: Area, name: str) -> bool:
    """Whether name is reserved in area: never mapped, never reported (SPEC §3)."""
    return name.startswith(".") or name in _RESERVED[area]


def _printable(text: str) -> str:
    # Surrogate escapes are not valid in JSON text; show the raw bytes as \xNN instead.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _target_of(name: str) -> tuple[str | None, str]:
    """The target a name stands for, or None and the reason it stands for none."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return None, "name is not valid UTF-8"
    if len(raw) > NAME_MAX:
        return None, f"name is {len(raw)} bytes long, longer than {NAME_MAX}"
    try:
        target = unescape_path(name)
    except EscapeError as exc:
        return None, f"name is not a valid escaped path: {exc.reason}"
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:
        return None, "name escapes bytes that are not valid UTF-8"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        # A newline or escape sequence in a target would forge lines in logs and mount tables.
        return None, "name escapes a control character"
    canonical = escape_path(target)
    if canonical != name:
        # One name per target: otherwise "home" and ".home" could both claim /home.
        return None, f"name is not the canonical escape of {target} (that is {canonical!r})"
    return target, ""


def target_refusal(target: str) -> str | None:
    """Why a normalized absolute target may never be mounted on, or None (SPEC §4)."""
    if target == "/":
        return "target / is forbidden"
    if target in RESERVED_TARGETS:
        return f"target {target} belongs to a reserved name"
    for prefix in FORBIDDEN_PREFIXES:
        if target == prefix:
            return f"target {target} is forbidden"
        if target.startswith(prefix + "/"):
            return f"target {target} is under forbidden {prefix}"
    return None


def _sort_key(entry: Entry) -> tuple[str, str, str, str]:
    return (entry.area.value, entry.name, entry.kind.value, entry.source)


def plan_entries(
    entries: Iterable[Entry],
    *,
    plain_allowlist: frozenset[str],
    modes: Mapping[str, MountMode],
) -> MountPlan:
    """The mount plan for these entries; never raises for what it finds in them."""
    rejected: list[Rejection] = []
    # target -> entries that passed every check on their own
    candidates: dict[str, list[Entry]] = {}

    ordered = sorted(entries, key=_sort_key)
    # A directory cannot hold a name twice; if the input does, trust none of them.
    seen = Counter((e.area, e.name) for e in ordered)
    for entry in ordered:
        if is_reserved(entry.area, entry.name):
            continue
        if seen[entry.area, entry.name] > 1:
            rejected.append(
                Rejection(
                    entry.area, entry.name, f"name appears more than once in the {entry.area} area"
                )
            )
            continue
        target, why = _target_of(entry.name)
        if target is None:
            rejected.append(Rejection(entry.area, entry.name, why))
            continue
        if entry.kind is not EntryKind.DIR:
            rejected.append(Rejection(entry.area, entry.name, _KIND_REASONS[entry.kind]))
            continue
        forbidden = target_refusal(target)
        if forbidden:
            rejected.append(Rejection(entry.area, entry.name, forbidden))
            continue
        if entry.area is Area.PLAIN and target not in plain_allowlist:
            rejected.append(
                Rejection(
                    entry.area,
                    entry.name,
                    f"plain entry for {target} is not on the plain allowlist",
                )
            )
            continue
        candidates.setdefault(target, []).append(entry)

    mounts: list[Mount] = []
    for target, claims in candidates.items():
        if len(claims) > 1:
            # Only entries that are mountable on their own conflict: a broken or off-allowlist
            # plain entry must not be able to suppress an encrypted mount.
            # Names are unique per area and canonical, so the claims come from both areas.
            why = f"target {target} is claimed by both the plain and the encrypted area"
            rejected.extend(Rejection(c.area, c.name, why) for c in claims)
            continue
        (entry,) = claims
        mounts.append(
            Mount(
                area=entry.area,
                name=entry.name,
                source=entry.source,
                target=target,
                mode=modes.get(target, MountMode.BIND),
                options=_OPTIONS.get(target, ()),
            )
        )

    # Parents before children: a parent has fewer components than any of its children.
    mounts.sort(key=lambda m: (m.target.count("/"), m.name, m.area.value))
    rejected.sort(key=lambda r: (r.area.value, r.name, r.reason))
    return MountPlan(tuple(mounts), tuple(rejected))
