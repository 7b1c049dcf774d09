"""pystate's repart.d definition: its name, where systemd-repart looks for it, its minimum.

systemd-repart makes the state partition on a disk that has none, from the definition
pystate ships (dracut-module/repart.d/, installed as /usr/lib/repart.d/). When discover
finds no state partition, the message says why repart did not make one, and for that
it needs the definition's SizeMinBytes=: `size_min` reads it from the file's text. Pure:
initrd/discover.py reads the file.

Only what systemd 252 does is modelled: a file of the same name in an earlier directory
replaces a later one as a whole; a symlink to /dev/null or an empty file masks it; in
[Partition] the last assignment of a key wins; sizes are 1024-based (K, M, G, T, P, E).
"""

from __future__ import annotations

import re

DEFINITION = "50-pystate-state.conf"
# systemd-repart's search path (CONF_PATHS "repart.d"), first match by name wins. Under
# --root=/sysroot (the initrd) each is read below the OS image's root.
SEARCH_DIRS = ("etc/repart.d", "run/repart.d", "usr/local/lib/repart.d", "usr/lib/repart.d")
# systemd-repart's own minimum when a definition sets none (repart.d(5)).
DEFAULT_SIZE_MIN = 10 << 20

_SUFFIXES = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE = re.compile(r"(\d+)(?:\.(\d+))?\s*([KMGTPE]?)B?")
_SECTION = re.compile(r"\[([^\]]*)\]")


def parse_size(text: str) -> int | None:
    """`1G`, `512M`, `1.5G`, `1073741824` → bytes (1024-based); None for anything else.

    systemd rounds SizeMinBytes= up to 4096; so does this.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        return None
    whole, fraction, suffix = m.group(1), m.group(2) or "", m.group(3)
    shift = _SUFFIXES[suffix]
    scale: int = 10 ** len(fraction)
    value = (int(whole + fraction) << shift) // scale
    return -(-value // 4096) * 4096


def size_min(text: str) -> int | None:
    """The definition's SizeMinBytes= in bytes: DEFAULT_SIZE_MIN when unset, None when the
    value is not a size systemd-repart would take (then no number is claimed)."""
    section = ""
    value: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = _SECTION.fullmatch(line)
        if m is not None:
            section = m.group(1)
            continue
        key, sep, rest = line.partition("=")
        if sep and section == "Partition" and key.strip() == "SizeMinBytes":
            value = rest.strip()
    if value is None or value == "":
        return DEFAULT_SIZE_MIN
    return parse_size(value)
