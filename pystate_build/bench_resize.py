"""``build.py bench-resize``: the resize service's figures in a QEMU guest, and its test machine.

The guest is the busybox test root plus the frozen pystate (build_tree), the tools the
service runs (cryptsetup, resize2fs, e2fsck, btrfs) and ``/rt/rt.py`` (guest_resize.py):
its init runs the commands named by ``rt.run=CMD,ARG;CMD…`` on the kernel command line and
powers off. Results come back as ``RT-<TAG> <json>`` console lines (``rt_results``).

The benchmark boots one machine (systemd initrd with pystate, 2 GiB state partition):
boot 1 provisions encrypted.img and measures, N times, the time from the policy first
deciding "grow" (the free space crossed the watermark) to the inner file system reporting
the larger size, and the grow throughput (image bytes added per second of the service's
grow steps, from /run/pystate/resize.json); it then fills and empties the image and leaves
an ext4 shrink request; boot 2 carries the shrink out offline (the initrd's code, on the
unmounted image) and reports its time per GiB removed. Repeated ``--runs`` times for the
offline figure. Medians are printed with the VM's configuration. ``--baseline`` boots, run by
run and alternating, a second machine with ``pystate.no-write-workqueue=0`` and prints both
and their ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import OUT
from . import qemu_harness as harness

if TYPE_CHECKING:
    from .qemu_machine import Machine

GUEST_TOOLS = ("cryptsetup", "resize2fs", "e2undo", "e2fsck", "mkfs.ext4", "btrfs")
RT_PREFIX = "RT-"
BENCH_STATE_SIZE = 2 * 1024**3
MEMORY = 1024
GIB = 1024**3
# The baseline of --baseline: dm-crypt as the kernel sets it up by default.
BASELINE = "pystate.no-write-workqueue=0"

GUEST_INIT = r"""#!/bin/busybox sh
# PID 1 of the resize test guest: run /rt/rt.py (rt.run= on the command line), power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
[ -r /run/pystate/boot.json ] && echo "PYSTATE-BOOT-JSON $(tr -d '\n' </run/pystate/boot.json)"
/usr/bin/python3 /rt/rt.py
sync
echo "RT-POWEROFF"
poweroff -f
"""


def build_guest_root(dest: Path, work: Path, *, test_hooks: bool = False) -> Path:
    """The test root with pystate, its tools and /rt/rt.py as PID 1's job (dest replaced);
    ``test_hooks``: a test build of pystate (rt.py's crash command needs it)."""
    from .elfclosure import library_closure
    from .roots import build_testroot
    from .tree import build_tree, install_path

    build_testroot(dest)
    build_tree(dest, freeze_dir=work / "freeze", test_hooks=test_hooks)
    binaries = []
    for tool in GUEST_TOOLS:
        found = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if found is None:
            raise FileNotFoundError(f"{tool} not found on the build machine")
        install_path(found, dest)
        binaries.append(Path(found))
    # glibc's pthread_cancel dlopen()s libgcc_s (btrfs scrub's threads abort without it).
    for lib in library_closure(binaries, dlopen=["libgcc_s.so.1"]):
        install_path(lib, dest)
    (dest / "rt").mkdir(exist_ok=True)
    shutil.copy2(Path(__file__).with_name("guest_resize.py"), dest / "rt/rt.py")
    (dest / "sbin/init").write_text(GUEST_INIT)
    (dest / "sbin/init").chmod(0o755)
    return dest


def rt_results(console: str) -> list[tuple[str, dict[str, object]]]:
    """The guest's ``RT-<TAG> <json>`` lines, in order (kernel messages may interleave)."""
    import re

    found = []
    for raw in console.splitlines():
        line = re.sub(r"^\[\s*\d+\.\d+\]\s*", "", raw)
        if not line.startswith(RT_PREFIX):
            continue
        tag, _, rest = line[len(RT_PREFIX) :].partition(" ")
        try:
            value = json.loads(rest) if rest else {}
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append((tag, value))
    return found


def rt_result(console: str, tag: str) -> dict[str, object] | None:
    """The last RT-<tag> result, or None."""
    values = [v for t, v in rt_results(console) if t == tag]
    return values[-1] if values else None


def make_machine(
    work: Path, initrd: Path, root: Path, *, state_size: int = BENCH_STATE_SIZE, name: str = ""
) -> Machine:
    """A machine of the guest root (build_guest_root) booted with Machine.run, its disk,
    TPM state and console logs in work."""
    from .disk import build_disk
    from .qemu_machine import Machine

    (work / "state/home").mkdir(parents=True, exist_ok=True)
    layout = build_disk(work / "disk.img", root, work / "state", state_size=state_size)
    return Machine(
        name or work.name, layout, initrd, work, expect=("RT-DONE",), timeout=420, memory=MEMORY
    )


def build_initrd_for(
    work: Path, out: Path, *, inner_fs: str = "ext4", test_hooks: bool = False
) -> Path:
    """A systemd initrd with pystate, its work files under work (not OUT); ``test_hooks``:
    build.py initrd --test-hooks (the crash tests)."""
    from .bench_unlock import build_initrd_in

    conf = None
    if inner_fs != "ext4":
        conf = work / f"pystate-{inner_fs}.conf"
        conf.write_text(f"[image]\ninner-fs = {inner_fs}\n")
    if conf is None:
        return build_initrd_in(work, out, test_hooks=test_hooks)
    from . import initrd

    saved = initrd.OUT
    initrd.OUT = work
    try:
        return initrd.build_initrd(out, conf=conf, test_hooks=test_hooks)
    finally:
        initrd.OUT = saved


def first_result(result: harness.BootResult, tag: str) -> dict[str, object]:
    value = rt_result(result.console, tag)
    if value is None:
        raise RuntimeError(f"the guest printed no RT-{tag}")
    return value


def offline_seconds(console: str, shrink: dict[str, object] | None) -> float | None:
    """The offline shrink's duration: the initrd's boot.json step when the initrd did it
    (its call site in the unlock path), else the guest's own run of the same code."""
    from .bench_unlock import step_times
    from .roots import boot_json

    report = boot_json(console)
    if report is not None and "offline-shrink" in step_times(report):
        return step_times(report)["offline-shrink"] / 1000
    if shrink is not None and shrink.get("detail"):
        return float(shrink["seconds"])  # type: ignore[arg-type]
    return None


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Figures:
    """One variant's figures over all its runs."""

    words: tuple[str, ...]  # kernel command-line words of its boots
    latencies: list[float] = field(default_factory=list)  # s, watermark -> larger size usable
    throughputs: list[float] = field(default_factory=list)  # image bytes per s of grow steps
    offline: list[float] = field(default_factory=list)  # s per GiB removed by the offline shrink
    step_ms: dict[str, list[float]] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)  # grows per crypt-resize method


def _measure(m: Machine, fig: Figures, args: argparse.Namespace, label: str) -> bool:
    """Two boots of a fresh machine: grows under a writer, then the offline shrink."""
    # The shrink request needs a small buffer: with 50:50 weights an image that took the
    # whole pool never shrinks (docs/resize.md, known limits).
    flags = f"dm-flags,{','.join(args.dm_flag)};" if args.dm_flag else ""
    first = m.run(
        f"{flags}bench-grow,{args.grows};dm-options;fill,32,0;delete-and-shrink,--buffer-min,64M",
        words=fig.words,
    )
    grow = rt_result(first.console, "BENCH-GROW")
    if grow is None or not grow["latencies"]:
        print(harness.describe(first), file=sys.stderr)
        return False
    fig.latencies += [float(x) for x in grow["latencies"]]  # type: ignore[attr-defined]
    fig.throughputs += [float(x) for x in grow["throughputs"]]  # type: ignore[attr-defined]
    for change in grow.get("grows", []):  # type: ignore[attr-defined]
        for name, ms in change["steps"].items():
            fig.step_ms.setdefault(name, []).append(float(ms))
        method = str(change.get("crypt_method", "?"))
        fig.methods[method] = fig.methods.get(method, 0) + 1
    options = first_result(first, "DM-OPTIONS")["options"]
    image_before = int(first_result(first, "SHRINK")["after"]["image"])  # type: ignore[index]
    second = m.run("offline-shrink", words=fig.words)
    shrink = rt_result(second.console, "OFFLINE")
    seconds = offline_seconds(second.console, shrink)
    if shrink is None or seconds is None:
        print(harness.describe(second), file=sys.stderr)
        return False
    removed = (image_before - int(shrink["after"]["file"])) / GIB  # type: ignore[index]
    fig.offline.append(seconds / removed)
    print(
        f"{label}: dm-crypt options {options}; grow latencies "
        f"{[round(x, 2) for x in grow['latencies']]} s; "  # type: ignore[attr-defined]
        f"offline shrink {removed:.2f} GiB in {seconds:.1f} s",
        flush=True,
    )
    return True


def _report(name: str, fig: Figures) -> None:
    print(f"{name}:")
    print(
        f"  grow watermark -> larger size usable: median {_median(fig.latencies):.2f} s "
        f"(min {min(fig.latencies):.2f}, max {max(fig.latencies):.2f}) "
        f"over {len(fig.latencies)} grows"
    )
    print(
        f"  grow throughput: median {_median(fig.throughputs) / GIB:.3f} GiB/s "
        f"({_median(fig.throughputs) / 2**20:.1f} MiB/s) of image over "
        f"{len(fig.throughputs)} grows"
    )
    print(
        "  grow steps, median ms: "
        + ", ".join(f"{name} {_median(values):.0f}" for name, values in fig.step_ms.items())
        + " (crypt-resize: the mapping's table swapped by "
        + ", ".join(f"{m} in {n} grows" for m, n in sorted(fig.methods.items()))
        + "; dm-table: DM_TABLE_LOAD and a resume without freezing the file system)"
    )
    print(
        f"  offline ext4 shrink at boot: median {_median(fig.offline):.1f} s per GiB removed "
        f"over {len(fig.offline)} runs ({', '.join(f'{x:.1f}' for x in fig.offline)})"
    )


def _cmd(args: argparse.Namespace) -> int:
    work = OUT / "bench-resize"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    initrd = build_initrd_for(work, work / "initrd.img")
    root = build_guest_root(work / "root", work)
    variants = {"pystate (defaults)": Figures(words=())}
    if args.baseline:
        variants[BASELINE] = Figures(words=(BASELINE,))
    for run in range(args.runs):
        for i, (name, fig) in enumerate(variants.items()):  # alternating: A B A B ...
            m = make_machine(work / f"m{run}-{i}", initrd, root)
            if not _measure(m, fig, args, f"run {run + 1} {name}"):
                return 1
    print(
        f"VM: QEMU {harness._accel()} (TCG unless PYSTATE_QEMU_ACCEL), 1 vCPU, {MEMORY} MiB, "
        f"virtio-blk raw sparse file (cache=unsafe), state ext4 {BENCH_STATE_SIZE // GIB} GiB, "
        "encrypted.img LUKS2 aes-xts-plain64 4K sectors, inner ext4, loop direct I/O"
        + (f", dm-crypt flags added: {' '.join(args.dm_flag)}" if args.dm_flag else "")
    )
    for name, fig in variants.items():
        _report(name, fig)
    if args.baseline:
        a, b = variants.values()
        print(
            f"ratios, defaults / {BASELINE}: grow reaction "
            f"{_median(a.latencies) / _median(b.latencies):.2f}, offline shrink per GiB "
            f"{_median(a.offline) / _median(b.offline):.2f}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bench-resize", help="grow latency and throughput, offline shrink time (QEMU)"
    )
    p.add_argument("--runs", type=int, default=3, help="machines to boot (default 3)")
    p.add_argument("--grows", type=int, default=5, help="grows measured per machine (default 5)")
    p.add_argument(
        "--dm-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="a dm-crypt optional flag added to the mapping's table before the grows "
        "(repeatable; e.g. no_write_workqueue: a lever measured, docs/performance.md)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help=f"also boot machines with {BASELINE} (alternating with the defaults) and print "
        "the ratios",
    )
    p.set_defaults(func=_cmd)
