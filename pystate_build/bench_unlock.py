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
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field, replace
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
    extra_modules: tuple[str, ...] = (),
    include: Path | None = None,
    install: tuple[str, ...] = (),
) -> Path:
    """build.py initrd, with its work and freeze directories under work (not OUT);
    ``test_hooks``: build.py initrd --test-hooks (the crash tests); ``conf``: the initrd's
    pystate.conf; the rest as initrd.build_initrd."""
    from . import initrd

    saved = initrd.OUT
    initrd.OUT = work  # build_initrd/build_payload keep their work files under OUT
    try:
        return initrd.build_initrd(
            out,
            with_pystate=with_pystate,
            systemd=systemd,
            test_hooks=test_hooks,
            conf=conf,
            extra_modules=extra_modules,
            include=include,
            install=install,
        )
    finally:
        initrd.OUT = saved


def step_times(report: dict[str, object]) -> dict[str, float]:
    steps = report.get("steps", [])
    assert isinstance(steps, list)
    return {s["name"]: float(s["ms"]) for s in steps if isinstance(s, dict)}


def step_processes(report: dict[str, object], names: tuple[str, ...]) -> int:
    steps = report.get("steps", [])
    assert isinstance(steps, list)
    return sum(
        int(s.get("processes", 0)) for s in steps if isinstance(s, dict) and s["name"] in names
    )


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


# A's unlock, as the issue defines it: the TPM unseal up to the dm-crypt mapping being active,
# with the header read that precedes the unseal (systemd-cryptsetup's time includes its own).
A_UNLOCK_STEPS = ("luks-header", "unseal", "loop-attach", "luks-open")


@dataclass
class Row:
    """One configuration's figures over its timed boots."""

    name: str
    size_bytes: int
    unlock_ms: list[float] = field(default_factory=list)
    initrd_ms: list[float] = field(default_factory=list)
    peak_kib: list[float] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        def med(values: list[float] | list[int]) -> float | None:
            return round(statistics.median(values), 1) if values else None

        return {
            "unlock_ms": med(self.unlock_ms),
            "initrd_ms": med(self.initrd_ms),
            "size_bytes": self.size_bytes,
            "peak_kib": med(self.peak_kib),
            "processes": med(self.processes),
            "boots": len(self.unlock_ms),
            "unlock_ms_all": self.unlock_ms,
            "initrd_ms_all": self.initrd_ms,
            **self.extra,
        }


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):8.1f} ({min(values):.0f}-{max(values):.0f})"


def _a_figures(row: Row, console: str, report: dict[str, object]) -> None:
    from .bench_systemd import A_UNIT, SWITCH_ROOT, parse_bench_lines

    units, peaks = parse_bench_lines(console)
    times = step_times(report)
    row.unlock_ms.append(round(sum(times.get(n, 0.0) for n in A_UNLOCK_STEPS), 1))
    row.initrd_ms.append(units[SWITCH_ROOT].active_enter / 1000)
    peak = peaks.get(A_UNIT.removesuffix(".service"))
    if peak is not None:
        row.peak_kib.append(peak.memory / 1024)
    # pystate itself plus the commands its unlock steps ran (counted by system/run.py)
    row.processes.append(1 + step_processes(report, A_UNLOCK_STEPS))
    row.steps.append(times)


def _b_figures(row: Row, console: str) -> None:
    from .bench_systemd import B_UNIT, SWITCH_ROOT, parse_bench_lines

    units, peaks = parse_bench_lines(console)
    unit = units[B_UNIT]
    row.unlock_ms.append((unit.main_exit - unit.main_start) / 1000)
    row.initrd_ms.append(units[SWITCH_ROOT].active_enter / 1000)
    peak = peaks.get(B_UNIT.removesuffix(".service"))
    if peak is not None:
        row.peak_kib.append(peak.memory / 1024)
        # PIDs allocated while it ran: an upper bound (kernel threads and udev count too)
        row.processes.append(peak.pids)


def _c_figures(row: Row, console: str) -> None:
    """C: systemd-cryptsetup waits for clevis-luks-askpass's answer; its PIDs include
    clevis's processes, which run meanwhile; the memory peak is the larger service's."""
    from .bench_systemd import C_ASKPASS, C_UNIT, SWITCH_ROOT, parse_bench_lines

    units, peaks = parse_bench_lines(console)
    unit = units[C_UNIT]
    row.unlock_ms.append((unit.main_exit - unit.main_start) / 1000)
    row.initrd_ms.append(units[SWITCH_ROOT].active_enter / 1000)
    crypt = peaks.get(C_UNIT.removesuffix(".service"))
    askpass = peaks.get(C_ASKPASS.removesuffix(".service"))  # clevis runs in its cgroup
    if crypt is not None:
        row.peak_kib.append(max(crypt.memory, askpass.memory if askpass else 0) / 1024)
        row.processes.append(crypt.pids)


def _unlocked(console: str, name: str) -> bool:
    """The crypt unit of mapping name ran to its end and is not among the failed units."""
    from .bench_systemd import FAILED_PREFIX, parse_bench_lines

    units, _ = parse_bench_lines(console)
    unit = units.get(f"systemd-cryptsetup@{name}.service")
    failed = any(
        line.removeprefix("PYSTATE-RUN-OUT ").startswith(
            f"{FAILED_PREFIX}systemd-cryptsetup@{name}"
        )
        for line in console.splitlines()
    )
    return unit is not None and unit.main_exit > 0 and not failed


def _mounted(console: str, name: str) -> bool:
    from .roots import parse_report

    mounts, _, _ = parse_report(console)
    return any(m[:2] == [f"/dev/mapper/{name}", "/etc"] for m in mounts)


def _build_all(
    work: Path, t: Path, reuse: bool, with_c: bool, cli_row: bool = False
) -> dict[str, Path]:
    from . import bench_systemd as bs

    crypt = ("crypt", "tpm2-tss")
    a_tree = bs.bench_tree(t / "tree-a", unit=bs.A_UNIT)
    b_tree = bs.systemd_tree(t / "tree-b")
    b0_tree = bs.systemd_tree(t / "tree-b0", provision=True)
    names = ("a", "b", "b0", "crypt", "crypt+pystate") + (("c",) if with_c else ())
    names += ("a-cli",) if cli_row else ()
    kept = {n: work / f"initrd-{n.replace('+', '-')}.img" for n in names}
    if reuse and all(p.exists() for p in kept.values()):
        return kept
    built = {}
    if cli_row:
        # the lever's baseline: the same A with the cryptsetup binary instead of libcryptsetup
        cli_tree = bs.bench_tree(
            t / "tree-a-cli", unit=bs.A_UNIT, environment="PYSTATE_CRYPTSETUP=cli"
        )
        built["a-cli"] = build_initrd_in(work, kept["a-cli"], include=cli_tree)
    if with_c:
        from .bench_clevis import MODULES

        c_tree = bs.systemd_tree(t / "tree-c", name=bs.C_NAME)
        built["c"] = build_initrd_in(
            work,
            kept["c"],
            with_pystate=False,
            extra_modules=MODULES,
            include=c_tree,
            install=bs.C_PROGRAMS,
        )
    return built | {
        "a": build_initrd_in(work, work / "initrd-a.img", include=a_tree),
        "b": build_initrd_in(
            work, work / "initrd-b.img", with_pystate=False, extra_modules=crypt, include=b_tree
        ),
        "b0": build_initrd_in(
            work,
            work / "initrd-b0.img",
            with_pystate=False,
            extra_modules=crypt,
            include=b0_tree,
            install=bs.PROVISION_PROGRAMS,
        ),
        "crypt": build_initrd_in(
            work, work / "initrd-crypt.img", with_pystate=False, extra_modules=crypt
        ),
        "crypt+pystate": build_initrd_in(
            work, work / "initrd-crypt-pystate.img", extra_modules=crypt
        ),
    }


def _b_image(path: Path) -> None:
    """B's encrypted.img: luks.format's parameters (pystate's), a passphrase keyslot."""
    from pystate_initrd.system import luks

    from .bench_systemd import B_IMAGE_SIZE, B_PASSPHRASE

    with open(path, "wb") as f:
        f.truncate(B_IMAGE_SIZE)
    luks.format(path, key=bytearray(B_PASSPHRASE.encode()), key_slot=0)


def _cmd(args: argparse.Namespace) -> int:
    from .bench_systemd import B_NAME, C_NAME, PRINT_SCRIPT, PROVISIONED
    from .disk import build_disk
    from .roots import boot_json, build_testroot

    work = OUT / "bench-unlock"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-unlock.", dir=work) as tmp:
        t = Path(tmp)
        root = build_testroot(t / "root")
        disks = {}
        for kind in ("a", "b"):
            (t / f"state-{kind}/home").mkdir(parents=True)
            if kind == "b":
                _b_image(t / "state-b/encrypted.img")
            disks[kind] = build_disk(
                t / f"disk-{kind}.img", root, t / f"state-{kind}", state_size=STATE_SIZE
            )
        from . import bench_clevis

        no_c = bench_clevis.missing()
        if no_c is not None:
            print(f"row C (clevis) left out: {no_c}", file=sys.stderr)
        initrds = _build_all(work, t, args.reuse_initrds, no_c is None, args.cli_row)
        sizes = {k: p.stat().st_size for k, p in initrds.items()}

        lost: dict[str, int] = {}  # boots whose binds were gone at switch-root, per row
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        count = [0]

        def boot(kind: str, initrd: Path) -> tuple[str, dict[str, object] | None] | None:
            layout = disks[kind.removesuffix("-cli")]
            count[0] += 1
            assert layout.root is not None
            append = (
                f"root=PARTUUID={layout.root.uuid} rootfstype=erofs ro quiet {FAIL_FAST}"
                f" testroot.run={PRINT_SCRIPT}"
            )
            machine = kind.removesuffix("-cli")  # A with the CLI boots A's disk and TPM
            result = harness.boot(
                layout.path, initrd=initrd, append=append, tpm_state=t / f"tpm-{machine}",
                timeout=300, log=logs / f"{count[0]:02d}-{initrd.stem}.log",
            )  # fmt: skip
            report = boot_json(result.console)
            if kind.startswith("a"):
                ok = report is not None and report.get("outcome") == "ok"
            elif initrd == initrds["b0"]:
                ok = PROVISIONED in result.console  # B0's own mounts are not timed
            else:
                # The unlock is what is timed: the crypt unit must have finished. Its binds
                # are counted apart: in some boots systemd stops them (successfully, children
                # first) just before initrd-switch-root.target, after they were mounted.
                name = B_NAME if kind == "b" else C_NAME
                ok = _unlocked(result.console, name)
                if ok and not _mounted(result.console, name):
                    lost[kind] = lost.get(kind, 0) + 1
            ok = ok and result.ok
            if not ok:
                print(harness.describe(result), file=sys.stderr)
                print(f"console: {logs / f'{count[0]:02d}-{initrd.stem}.log'}", file=sys.stderr)
                return None
            return result.console, report

        a = Row("a", sizes["a"])
        b = Row("b", sizes["b"])
        c = Row("c", sizes.get("c", 0))
        a_cli = Row("a-cli", sizes.get("a-cli", 0))
        first = boot("a", initrds["a"])
        provisioned = boot("b", initrds["b0"])
        if first is None or provisioned is None or first[1] is None:
            return 1
        rows: list[tuple[str, Row]] = [(k, r) for k, r in (("a", a), ("b", b)) if k in args.rows]
        pcr7 = bench_clevis.pcr7_of(provisioned[0])
        if "c" in initrds and pcr7 is not None and "c" in args.rows:
            disks["c"] = replace(
                disks["b"],
                path=bench_clevis.make_c_disk(
                    disks["b"].path, disks["b"], t / "disk-c.img", t / "tpm-c", pcr7
                ),
            )
            rows.append(("c", c))
        if "a-cli" in initrds:
            rows.append(("a-cli", a_cli))
        a.extra["provision_ms"] = first[1]["total_ms"]
        a.extra["provision_steps"] = step_times(first[1])
        print(f"provisioning boots done: pystate {first[1]['total_ms']} ms", file=sys.stderr)
        for i in range(args.boots):
            for kind, row in rows:
                got = boot(kind, initrds[kind])
                if got is None:
                    return 1
                console, report = got
                if kind.startswith("a"):
                    assert report is not None
                    _a_figures(row, console, report)
                elif kind == "b":
                    _b_figures(row, console)
                else:
                    _c_figures(row, console)
                print(
                    f"boot {i + 1} {kind}: unlock {row.unlock_ms[-1]:.0f} ms,"
                    f" initrd {row.initrd_ms[-1]:.0f} ms",
                    file=sys.stderr,
                )
    figures = _figures(a, b, sizes)
    figures["binds_lost_at_switch_root"] = lost
    if a_cli.unlock_ms:
        figures["a_cli"] = a_cli.summary()
        figures["a_cli_steps_ms"] = medians_of(a_cli.steps)
    if c.unlock_ms:
        figures["c"] = c.summary()
        figures["ratio_unlock_a_c"] = _ratio(figures["a"]["unlock_ms"], figures["c"]["unlock_ms"])  # type: ignore[index]
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        _print_table(figures, a)
    return 0


def _ratio(x: object, y: object) -> float | None:
    if isinstance(x, int | float) and isinstance(y, int | float) and y:
        return round(x / y, 3)
    return None


def _pairwise(xs: list[float], ys: list[float]) -> list[float]:
    return [round(x / y, 3) for x, y in zip(xs, ys, strict=False) if y]


def _figures(a: Row, b: Row, sizes: dict[str, int]) -> dict[str, object]:
    sa, sb = a.summary(), b.summary()
    pairs = _pairwise(a.unlock_ms, b.unlock_ms)
    pairs_initrd = _pairwise(a.initrd_ms, b.initrd_ms)
    return {
        "ratio_unlock": round(statistics.median(pairs), 3) if pairs else None,
        "ratio_initrd_time": round(statistics.median(pairs_initrd), 3) if pairs_initrd else None,
        "ratio_size": _ratio(sa["size_bytes"], sb["size_bytes"]),
        "ratio_unlock_pairs": pairs,
        "ratio_initrd_time_pairs": pairs_initrd,
        "added_to_crypt_initrd_bytes": sizes["crypt+pystate"] - sizes["crypt"],
        "a": sa,
        "b": sb,
        "a_steps_ms": medians_of(a.steps),
    }


def medians_of(rows: list[dict[str, float]]) -> dict[str, float]:
    names = [n for n in UNLOCK_STEPS if any(n in r for r in rows)]
    return {n: statistics.median([r[n] for r in rows if n in r]) for n in names}


def _print_table(f: dict[str, object], a: Row) -> None:
    cols = [("A pystate", f["a"]), ("B systemd-cryptsetup", f["b"])]
    if "c" in f:
        cols.append(("C clevis", f["c"]))
    if "a_cli" in f:
        cols.append(("A, cryptsetup binary", f["a_cli"]))
    summaries = [s for _, s in cols]
    assert all(isinstance(s, dict) for s in summaries)

    def mib(s: object) -> str:
        assert isinstance(s, dict)
        return f"{int(s['size_bytes']) / 2**20:.2f}"

    rows = (
        ("unlock, ms (min-max)", [_spread_of(s, "unlock_ms") for s in summaries],
         f["ratio_unlock"]),
        ("whole initrd, ms (min-max)", [_spread_of(s, "initrd_ms") for s in summaries],
         f["ratio_initrd_time"]),
        ("initrd size, MiB (zstd)", [mib(s) for s in summaries], f["ratio_size"]),
        ("peak memory of the unlock, KiB", [s["peak_kib"] for s in summaries], None),  # type: ignore[index]
        ("processes (A: exact; B, C: PIDs)", [s["processes"] for s in summaries], None),  # type: ignore[index]
    )  # fmt: skip
    print(f"{'figure':<34}" + "".join(f"{name:>24}" for name, _ in cols) + f"{'A/B':>8}")
    for label, values, ratio in rows:
        line = f"{label:<34}" + "".join(f"{v!s:>24}" for v in values)
        print(line + f"{'' if ratio is None else ratio!s:>8}")
    added = f["added_to_crypt_initrd_bytes"]
    assert isinstance(added, int)
    print(f"pystate added to an initrd with crypt + tpm2-tss: {added / 2**20:.2f} MiB")
    sa = f["a"]
    assert isinstance(sa, dict)
    print(f"pystate's first boot (provisioning): {sa.get('provision_ms')} ms")
    print("A's steps, median ms" + (" (with the cryptsetup binary):" if "a_cli" in f else ":"))
    steps, cli = f["a_steps_ms"], f.get("a_cli_steps_ms", {})
    assert isinstance(steps, dict) and isinstance(cli, dict)
    for name, ms in steps.items():
        print(f"  {name:<16} {ms:8.1f}" + (f" ({cli[name]:.1f})" if name in cli else ""))


def _spread_of(s: dict[str, object], key: str) -> str:
    values = s.get(f"{key}_all")
    return _spread(values).strip() if isinstance(values, list) else "-"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bench-unlock", help="median unlock step timings over N boots, initrd size added"
    )
    p.add_argument(
        "--boots", type=int, default=5, help="timed boots of each row, alternating (default 5)"
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument(
        "--rows",
        type=lambda text: set(text.split(",")),
        default={"a", "b", "c"},
        help="the rows to time, of a,b,c (default all; the provisioning boots always run)",
    )
    p.add_argument(
        "--cli-row",
        action="store_true",
        help="one more row: A with the cryptsetup binary (PYSTATE_CRYPTSETUP=cli), the lever's "
        "baseline",
    )
    p.add_argument(
        "--reuse-initrds",
        action="store_true",
        help="use the initrds an earlier run left in out/bench-unlock/ (developing the bench)",
    )
    p.set_defaults(func=_cmd)
