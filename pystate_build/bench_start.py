"""``build.py bench-start``: the frozen program's start time against bare Python (issue 13).

In a chroot of the tree that ``build.py tree`` lays out (built afresh, or ``--tree DIR``),
runs these command lines in turn, ``--runs`` times (default 30), round after round so that
a change of load on the host touches every row alike:

- ``python3 -I -S -c pass``: the interpreter's own start, the yardstick;
- ``pystate --version``;
- ``pystate boot``: the tree has no /proc, so the boot stops at reading /proc/cmdline, just
  after its imports (initrd/boot.py and everything it pulls in) and before any real work:
  the start of pystate.service's command line;
- with ``--baseline DIR``, a tree built from another checkout (the one before a change),
  the two pystate rows again in that tree, in the same rounds.

Each figure is the wall time of the whole ``chroot TREE …`` process (chroot's own exec is
in every row alike); printed as median (min-max) in ms and the ratio of medians to bare
Python; ``--json`` for a machine. A benchmark, not a test: nothing fails on a slow figure
(tests/test_build.py checks what is imported instead). Needs root, for chroot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError

from . import OUT

BARE = "python3 -I -S -c pass"
VERSION = "pystate --version"
BOOT = "pystate boot (to /proc/cmdline)"
BASELINE = "baseline: "
# The command lines, as run inside the tree.
ARGV = {
    BARE: ("/usr/bin/python3", "-I", "-S", "-c", "pass"),
    VERSION: ("/usr/bin/pystate", "--version"),
    BOOT: ("/usr/bin/pystate", "boot"),
}
CHROOT = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "chroot"
ENV = {"PATH": "/usr/bin", "LANG": "C"}


class BenchStartError(PystateError):
    """The start-time benchmark cannot run."""


@dataclass(frozen=True)
class Row:
    """One command line's figures, in ms; ``ratio``: its median over bare Python's."""

    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    ratio: float


def summarise(times: dict[str, list[float]]) -> list[Row]:
    """Rows in the order of ``times`` (seconds per run), ratios to the ``BARE`` row."""
    bare = statistics.median(times[BARE])
    return [
        Row(
            name=name,
            median_ms=round(statistics.median(values) * 1000, 2),
            min_ms=round(min(values) * 1000, 2),
            max_ms=round(max(values) * 1000, 2),
            ratio=round(statistics.median(values) / bare, 2),
        )
        for name, values in times.items()
    ]


def render(rows: list[Row], tree: Path, runs: int) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"start time in a chroot of {tree}, {runs} rounds, median (min-max):"]
    for r in rows:
        figures = f"{r.median_ms:6.1f} ms ({r.min_ms:.1f}-{r.max_ms:.1f})"
        lines.append(f"  {r.name:<{width}}  {figures:<24}  {r.ratio:.2f}x bare")
    return "\n".join(lines)


def _run(tree: Path, argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROOT, str(tree), *argv], capture_output=True, text=True, env=ENV, check=False
    )


def check_tree(tree: Path) -> None:
    """Each command line does what the row says, once, before anything is timed."""
    if not (tree / "usr/bin/pystate").exists():
        raise BenchStartError(f"{tree} is not a tree of build.py tree (no usr/bin/pystate).")
    bare = _run(tree, ARGV[BARE])
    if bare.returncode != 0:
        raise BenchStartError(f"{BARE} fails in {tree}: {bare.stderr.strip()}")
    version = _run(tree, ARGV[VERSION])
    if version.returncode != 0 or not version.stdout.startswith("pystate "):
        raise BenchStartError(f"{VERSION} fails in {tree}: {version.stderr.strip()}")
    boot = _run(tree, ARGV[BOOT])
    if boot.returncode != 1 or "/proc/cmdline" not in boot.stderr:
        raise BenchStartError(
            f"pystate boot in {tree} did not stop at /proc/cmdline "
            f"(status {boot.returncode}: {boot.stderr.strip()[-200:]}).",
            hint="the tree must have no /proc: the row measures the start, not a boot",
        )


def measure(tree: Path, runs: int, baseline: Path | None = None) -> dict[str, list[float]]:
    """Seconds per run of each row, the rows alternating round after round."""
    plan = [(name, tree, argv) for name, argv in ARGV.items()]
    if baseline is not None:
        plan += [(BASELINE + name, baseline, ARGV[name]) for name in (VERSION, BOOT)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    for _ in range(runs):
        for name, root, argv in plan:
            command = [CHROOT, str(root), *argv]
            start = time.perf_counter()
            subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, check=False
            )
            times[name].append(time.perf_counter() - start)
    return times


def bench_start(
    tree: Path | None = None, *, runs: int = 30, baseline: Path | None = None
) -> tuple[Path, list[Row]]:
    """Build the tree (into out/bench-start/tree) unless ``tree`` is given; measure."""
    if os.geteuid() != 0:
        raise BenchStartError("bench-start runs chroot: run it as root.")
    if runs < 1:
        raise BenchStartError(f"--runs {runs}: at least 1.")
    if tree is None:
        from .tree import build_tree

        work = OUT / "bench-start"
        tree = work / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        build_tree(tree, freeze_dir=work / "freeze")
    for root in (tree, *([baseline] if baseline else [])):
        check_tree(root)
    return tree, summarise(measure(tree, runs, baseline))


def _cmd(args: argparse.Namespace) -> int:
    tree, rows = bench_start(args.tree, runs=args.runs, baseline=args.baseline)
    if args.json:
        figures = {"tree": str(tree), "runs": args.runs, "rows": [asdict(r) for r in rows]}
        print(json.dumps(figures, indent=2))
    else:
        print(render(rows, tree, args.runs))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bench-start",
        help="start time of the frozen program against bare python3 (chroot of the tree)",
        description="Time `pystate --version`, `pystate boot` (up to /proc/cmdline: its "
        "imports) and `python3 -I -S -c pass` in a chroot of the tree, alternately, and print "
        'medians and the ratio to bare Python (docs/build.md, "Start time"). Needs root.',
    )
    p.add_argument("--tree", type=Path, help="an existing tree (build.py tree DIR); default: "
                   "build one in out/bench-start/tree")  # fmt: skip
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="another tree (say, built from the commit before a change): its "
                   "pystate rows are measured in the same rounds")  # fmt: skip
    p.add_argument("--runs", type=int, default=30, help="rounds (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd)
