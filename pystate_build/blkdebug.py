"""QEMU blkdebug configurations: I/O errors injected on chosen sectors of a disk (pure).

QEMU's ``blkdebug`` block driver sits between the raw format and the image file. A rule
``[inject-error]`` becomes active when its ``event`` fires (``read_aio`` / ``write_aio``: the
raw format driver raises them before every guest read / write) and then fails each request
of its ``iotype`` that *contains* the rule's ``sector`` (512-byte units of the image file)
with ``errno``; ``once`` removes it after the first failure. One rule matches one sector, so a
byte range is covered by one rule per 4 KiB block: every request of the guest's 4 KiB
file systems and dm-crypt sectors that touches the range contains one of those starts.

``config_text(rules)`` writes the file; ``qemu_harness`` wraps a disk in the driver when
``boot(..., blkdebug={index: config})`` is asked for it (``drive_spec``).
"""

from __future__ import annotations

import errno as errnos
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
BLOCK = 4096
IOTYPES = {"read_aio": "read", "write_aio": "write"}


@dataclass(frozen=True)
class Injection:
    """Fail the guest's ``event`` requests that contain ``sector`` with ``errno``."""

    event: str  # read_aio or write_aio
    sector: int  # 512-byte units from the start of the disk image
    errno: int = errnos.EIO
    once: bool = False

    def __post_init__(self) -> None:
        if self.event not in IOTYPES:
            raise ValueError(f"blkdebug event {self.event!r} is not one of {sorted(IOTYPES)}")
        if self.sector < 0:
            raise ValueError(f"sector {self.sector} is negative")


def covering(event: str, start: int, length: int, *, once: bool = False) -> list[Injection]:
    """Rules for every 4 KiB block that the byte range [start, start+length) touches."""
    if length <= 0:
        return []
    first = start // BLOCK * BLOCK
    return [
        Injection(event, offset // SECTOR, once=once)
        for offset in range(first, start + length, BLOCK)
    ]


def config_text(rules: Iterable[Injection]) -> str:
    """The blkdebug configuration file. ``iotype`` is set because a rule, once active,
    would otherwise also fail the other direction's requests on its sector."""
    sections = []
    for rule in rules:
        sections.append(
            "[inject-error]\n"
            f'event = "{rule.event}"\n'
            f'iotype = "{IOTYPES[rule.event]}"\n'
            f'errno = "{rule.errno}"\n'
            f'sector = "{rule.sector}"\n'
            f'once = "{"on" if rule.once else "off"}"\n'
        )
    return "\n".join(sections)


def write_config(path: Path, rules: Sequence[Injection]) -> Path:
    if not rules:
        raise ValueError("a blkdebug configuration without a rule injects nothing")
    path.write_text(config_text(rules))
    return path


def drive_spec(disk: Path, config: Path | None) -> str:
    """The ``-drive`` image part: the raw file, or raw over blkdebug over the file."""
    if config is None:
        return f"file={disk},format=raw"
    return (
        f"driver=raw,file.driver=blkdebug,file.config={config},"
        f"file.image.driver=file,file.image.filename={disk}"
    )
