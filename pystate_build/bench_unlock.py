"""``build.py bench-unlock``: the figures of SPEC §10 for the encrypted boot, from boot.json.

Builds a systemd initrd with pystate and one without, a test-root disk with a
1 GiB state partition, boots it once to provision encrypted.img, then N more
times (default 5) to unlock it with the TPM (one swtpm state for all boots),
and prints the median of each unlock step (luks-header, unseal, loop-attach,
luks-open, inner-fsck, mount-encrypted, measure-pcr15, mounts) and of pystate's
total, read from /run/pystate/boot.json, which the test root prints on the
console. Also prints the size the pystate module adds to the initrd.

Its builds go to OUT/bench-unlock/ (initrd work directory included), apart
from other builds running in the same checkout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from . import OUT
from . import qemu_harness as harness
from .qemu_machine import FAIL_FAST

UNLOCK_STEPS = (
    "luks-header",
    "unseal",
    "loop-attach",
    "luks-open",
    "inner-fsck",
    "mount-encrypted",
    "measure-pcr15",
    "plan",
    "mounts",
)
STATE_SIZE = 1024 * 1024 * 1024  # room for the 256 MiB minimum image above the reserve
# Fail fast: no emergency shell waiting for a password when a boot stops.


def build_initrd_in(
    work: Path,
    out: Path,
    *,
    with_pystate: bool = True,
    systemd: bool = True,
    test_hooks: bool = False,
    conf: Path | None = None,
) -> Path:
    """build.py initrd, with its work and freeze directories under work (not OUT);
    ``test_hooks``: build.py initrd --test-hooks (the crash tests); ``conf``: the initrd's
    pystate.conf."""
    from . import initrd

    saved = initrd.OUT
    initrd.OUT = work  # build_initrd/build_payload keep their work files under OUT
    try:
        return initrd.build_initrd(
            out, with_pystate=with_pystate, systemd=systemd, test_hooks=test_hooks, conf=conf
        )
    finally:
        initrd.OUT = saved


def step_times(report: dict[str, object]) -> dict[str, float]:
    steps = report.get("steps", [])
    assert isinstance(steps, list)
    return {s["name"]: float(s["ms"]) for s in steps if isinstance(s, dict)}


def medians(reports: list[dict[str, object]]) -> dict[str, float]:
    rows = [step_times(r) for r in reports]
    result = {}
    for name in UNLOCK_STEPS:
        values = [row[name] for row in rows if name in row]
        if values:
            result[name] = statistics.median(values)
    totals = [float(r["total_ms"]) for r in reports if isinstance(r.get("total_ms"), int | float)]
    if totals:
        result["pystate total"] = statistics.median(totals)
    return result


def _cmd(args: argparse.Namespace) -> int:
    from .disk import build_disk
    from .roots import boot_json, build_testroot

    work = OUT / "bench-unlock"
    work.mkdir(parents=True, exist_ok=True)
    with_ = build_initrd_in(work, work / "initrd-pystate.img")
    without = build_initrd_in(work, work / "initrd-none.img", with_pystate=False)
    added = with_.stat().st_size - without.stat().st_size
    print(
        f"initrd: {with_.stat().st_size / 2**20:.1f} MiB with pystate, "
        f"{without.stat().st_size / 2**20:.1f} MiB without: pystate adds {added / 2**20:.1f} MiB"
        " (zstd)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-unlock.", dir=work) as tmp:
        t = Path(tmp)
        root = build_testroot(t / "root")
        (t / "state/home").mkdir(parents=True)
        layout = build_disk(t / "disk.img", root, t / "state", state_size=STATE_SIZE)
        assert layout.root is not None
        append = f"root=PARTUUID={layout.root.uuid} rootfstype=erofs ro quiet {FAIL_FAST}"
        reports = []
        for i in range(args.boots + 1):
            result = harness.boot(
                layout.path, initrd=with_, append=append, tpm_state=t / "tpm", timeout=300
            )
            report = boot_json(result.console)
            if not result.ok or report is None or report.get("outcome") != "ok":
                print(harness.describe(result), file=sys.stderr)
                return 1
            kind = "provision" if i == 0 else "unlock"
            print(f"boot {i} ({kind}): {result.duration:.1f} s, pystate {report['total_ms']} ms")
            if i > 0:
                reports.append(report)
    print(f"median of {len(reports)} unlocking boots (ms, from boot.json):")
    for name, ms in medians(reports).items():
        print(f"  {name:<16} {ms:8.1f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bench-unlock", help="median unlock step timings over N boots, initrd size added"
    )
    p.add_argument("--boots", type=int, default=5, help="unlocking boots to measure (default 5)")
    p.set_defaults(func=_cmd)
