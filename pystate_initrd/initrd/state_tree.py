"""Reading the state tree: the entries of each area, never following a symlink, then the
mount plan for them (formats/plan.py decides; this only lists directories).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pystate_initrd.formats import plan


def scan_area(directory: Path, area: plan.Area) -> list[plan.Entry]:
    """The entries of one area's directory, sorted by name; symlinks are never followed."""
    base = os.path.abspath(directory)
    entries: list[plan.Entry] = []
    try:
        with os.scandir(base) as it:
            for item in it:
                # DirEntry answers from d_type where it can and lstat()s otherwise.
                if item.is_symlink():
                    kind = plan.EntryKind.SYMLINK
                elif item.is_dir(follow_symlinks=False):
                    kind = plan.EntryKind.DIR
                elif item.is_file(follow_symlinks=False):
                    kind = plan.EntryKind.FILE
                else:
                    kind = plan.EntryKind.OTHER
                entries.append(plan.Entry(area, item.name, kind, os.path.join(base, item.name)))
    except OSError as exc:
        raise plan.PlanError(
            f"cannot read the {area} state directory {base}: {exc.strerror or exc}",
            hint="is the state file system mounted?",
        ) from exc
    entries.sort(key=lambda e: e.name)
    return entries


def build_plan(
    plain_dir: Path | None,
    encrypted_dir: Path | None,
    *,
    plain_allowlist: frozenset[str] = frozenset({"/home"}),
    modes: Mapping[str, plan.MountMode] = plan.NO_MODES,
) -> plan.MountPlan:
    """Scan the areas that are there and plan their mounts (SPEC §4)."""
    entries: list[plan.Entry] = []
    if plain_dir is not None:
        entries += scan_area(plain_dir, plan.Area.PLAIN)
    if encrypted_dir is not None:
        entries += scan_area(encrypted_dir, plan.Area.ENCRYPTED)
    return plan.plan_entries(entries, plain_allowlist=plain_allowlist, modes=modes)
