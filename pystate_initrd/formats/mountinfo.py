"""/proc/self/mountinfo, parsed (proc(5)): who is mounted where, from what.

The kernel escapes space, tab, newline and backslash in paths as ``\\NNN`` (octal);
``unescape`` undoes exactly that. Lines that do not have the documented shape are
skipped, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    parent_id: int
    devnum: tuple[int, int]  # major, minor (0:N for btrfs and other anonymous devices)
    root: str  # the path within the file system that is mounted here
    mountpoint: str
    options: str  # per-mount options
    fstype: str
    source: str


def unescape(field: str) -> str:
    """Undo the kernel's octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 backslash)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_line(line: str) -> MountInfo | None:
    """One mountinfo line, or None when it is not one (proc(5): optional fields end at '-')."""
    # Single spaces only: str.split() would also split at \x1c-\x1f, \x85 or \u2028, which
    # the kernel leaves unescaped in a path.
    fields = line.rstrip("\n").split(" ")
    if len(fields) < 10 or "-" not in fields[6:]:
        return None
    sep = fields.index("-", 6)
    if len(fields) < sep + 3:
        return None
    major, colon, minor = fields[2].partition(":")
    if not (colon and major.isdigit() and minor.isdigit()):
        return None
    if not (fields[0].isdigit() and fields[1].isdigit()):
        return None
    return MountInfo(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        devnum=(int(major), int(minor)),
        root=unescape(fields[3]),
        mountpoint=unescape(fields[4]),
        options=fields[5],
        fstype=fields[sep + 1],
        source=unescape(fields[sep + 2]),
    )


def parse(text: str) -> list[MountInfo]:
    # Lines end at "\n" only: str.splitlines() would also break at \x1c-\x1e, \x85, \u2028.
    return [m for m in map(parse_line, text.split("\n")) if m is not None]


def visible_at(mounts: list[MountInfo], mountpoint: str) -> MountInfo | None:
    """The mount one sees at mountpoint: the last one mounted there."""
    found = None
    for m in mounts:
        if m.mountpoint == mountpoint:
            found = m
    return found
