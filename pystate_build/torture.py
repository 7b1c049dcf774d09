"""``build.py torture``: power cuts at random instants, and the disk and TPM faults (issue 14).

A campaign, not part of CI (a short seeded slice is: tests/test_torture.py). The VM is
killed (QEMU SIGKILL, ``qemu_harness.KillAfter``) at a random instant inside each of:
provisioning (the seal, luks-format, mkfs, layout/seeding and commit steps), an online grow
under a writer, a btrfs online shrink (under a writer too), the offline ext4 shrink in the
initrd, the re-seal after a recovery unlock, and a factory reset. The instant is a seeded
fraction of the window an uncut boot of the same machine measured (the arrival times of
its console lines: the initrd's ``pystate: STEP done in`` lines; in the booted system the
resize's decision line, echoed by the guest, and its steps' time as pystate logs it),
counted from an anchor line. The next boot of the machine must come up with
one complete image (``encrypted.img.new`` gone), every file whose fsync returned before the
cut intact (the guest's writer logs ``TT-FSYNC name sha256`` once the file and its
directory are fsync'd; the next boot lists every file with its sha256), ``e2fsck -fn`` /
``btrfs check --readonly`` clean on the outer and the inner file system (each frozen while
checked), and the markers kept (``/state/.torture-marker``, written when the disk was made,
and one inside the image): nothing remade. A cut's row has the shape of
``torture_faults``' rows (kind, case, injected, outcome, ok, detail, seconds) plus
``cut_at_ms``, ``fsynced_files``, ``lost_files`` and the rest of ``torture_plan.verdict``.

The disk model. The torture boots give the state disk ``cache=writeback``, not the
harness's default ``cache=unsafe``: QEMU then passes every guest flush (FLUSH, FUA) on as an
fdatasync of the image file, and a SIGKILL loses what QEMU had not yet handed to the host
kernel: the guest's own dirty pages and the requests still queued in QEMU. That is what a
power cut takes from a disk whose volatile cache honours flushes: nothing the guest flushed
(and saw complete) is lost. ``cache=unsafe`` acknowledges a flush without doing it, which
only makes a difference if the host itself crashes, but it is a lie about the flush the
whole campaign is about, so it is not used. What a SIGKILL does *not* model: a disk that
loses or reorders writes it completed but was not yet asked to flush (QEMU wrote them to
the host page cache, which survives). That harsher disk is the faults' part
(``torture_faults``). docs/reliability.md has the figures and how to read a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import CACHE, OUT, REPO
from . import qemu_harness as harness
from . import torture_plan as plan
from .torture_plan import Cut, Window

MIB = 1 << 20
STATE_SIZE = 2 << 30  # room for many grows: the pool is what the state partition leaves
GROW_MIB = 64
BOOT_TIMEOUT = 300.0
DISK_CACHE = "writeback"  # flushes honoured: see the module docstring
LOUD = "loglevel=7"  # the initrd's info lines on the console: the windows' anchors
EXTEND = "pystate.debug-extend-pcr=7"
RESET = "pystate.factory-reset=1"
CONF = {
    # machine E: ext4 inside; the reset word alone resets (no UEFI request needed)
    "ext4": "[state]\nfactory-reset-request = none\n",
    "btrfs": "[image]\ninner-fs = btrfs\n",
}


@dataclass
class Rig:
    """One machine of the campaign, and what the host knows of its disk."""

    machine: Any  # qemu_machine.Machine
    inner_fs: str
    marks: dict[str, str] = field(default_factory=dict)  # outer/inner marker sha256
    expected: dict[str, str] = field(default_factory=dict)  # fsync'd since the last check
    extended: bool = False  # the boots extend PCR 7 (the key is sealed to that)
    recovery_key: str = ""
    pending: tuple[Cut, dict[str, object]] | None = None  # a cut whose next boot is due
    broken: bool = False  # a boot after a cut did not come up: the next cut gets a new one
    windows: dict[str, Window] = field(default_factory=dict)


@dataclass
class Campaign:
    work: Path
    root: Path
    initrds: dict[str, Path]
    rows: list[dict[str, object]] = field(default_factory=list)
    rigs: dict[str, Rig] = field(default_factory=dict)
    retired: list[Rig] = field(default_factory=list)  # broken machines, kept for their logs
    factory: tuple[Any, Path] | None = None  # the pristine E disk: (layout, copy)
    windows: dict[str, Window] = field(default_factory=dict)  # provisioning steps
    json_path: Path | None = None
    echo: bool = True

    def say(self, text: str) -> None:
        if self.echo:
            print(f"torture: {text}", flush=True)

    def add(self, row: dict[str, object]) -> None:
        self.rows.append(row)
        self.say(f"{'ok  ' if row['ok'] else 'FAIL'} {row['kind']} {row['case']}: {row['outcome']}")
        if self.json_path is not None:
            write_json(self.json_path, self.rows)


# --- builds --------------------------------------------------------------------------------


def source_key(*extra: str, guest: bool = False) -> str:
    """A hash of what a build is made of (pystate's sources, the dracut module, and for the
    guest root its /rt/rt.py): a change rebuilds it."""
    h = hashlib.sha256("\0".join(extra).encode())
    for top in ("pystate_initrd", "dracut-module"):
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    if guest:
        h.update((REPO / "pystate_build/guest_resize.py").read_bytes())
    return h.hexdigest()[:16]


def build(inner_fs: set[str]) -> tuple[Path, dict[str, Path]]:
    """The guest root (the resize guest plus fsfreeze) and the test-hooks initrds, kept in
    cache/torture/ while their sources are unchanged (the CI slice reuses them)."""
    from .bench_unlock import build_initrd_in

    cache = CACHE / "torture"
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"root-{source_key(guest=True)}"
    if not (root / ".torture-built").exists():  # (a build cut short is made again)
        from .bench_resize import build_guest_root
        from .elfclosure import library_closure
        from .tree import install_path

        build_guest_root(root, cache / "root-work", test_hooks=False)
        tool = shutil.which("fsfreeze", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if tool is None:
            raise FileNotFoundError("fsfreeze not found on the build machine (util-linux)")
        install_path(tool, root)
        for lib in library_closure([Path(tool)]):
            install_path(lib, root)
        (root / ".torture-built").write_text("")
    initrds = {}
    for fs in sorted(inner_fs):
        out = cache / f"initrd-{fs}-{source_key(CONF[fs])}.img"
        if not out.exists():
            conf = cache / f"pystate-{fs}.conf"
            conf.write_text(CONF[fs])
            build_initrd_in(cache / f"initrd-work-{fs}", out, test_hooks=True, conf=conf)
        initrds[fs] = out
    return root, initrds


def new_rig(c: Campaign, name: str, inner_fs: str) -> Rig:
    """A machine with a fresh disk (the guest root, a 2 GiB state partition holding the
    outer marker) and a fresh TPM."""
    from .disk import build_disk
    from .qemu_machine import Machine

    work = c.work / name
    if work.exists():
        shutil.rmtree(work)
    (work / "state/home").mkdir(parents=True)
    marker = os.urandom(4096)
    (work / "state/.torture-marker").write_bytes(marker)
    layout = build_disk(work / "disk.img", c.root, work / "state", state_size=STATE_SIZE)
    m = Machine(name, layout, c.initrds[inner_fs], work, expect=("RT-DONE",), timeout=BOOT_TIMEOUT)
    m.cache = DISK_CACHE
    return Rig(m, inner_fs, marks={"outer": hashlib.sha256(marker).hexdigest()})


def provision_rig(c: Campaign, index: int) -> Rig:
    """A fresh copy of machine E's factory disk with a fresh TPM: a first boot to cut."""
    from .qemu_machine import Machine

    assert c.factory is not None
    layout, pristine = c.factory
    work = c.work / f"p{index}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(pristine), str(disk)], check=True)
    m = Machine(
        f"P{index}", replace(layout, path=disk), c.initrds["ext4"], work,
        expect=("RT-DONE",), timeout=BOOT_TIMEOUT,
    )  # fmt: skip
    m.cache = DISK_CACHE
    e = c.rigs["E"]
    return Rig(m, "ext4", marks={"outer": e.marks["outer"]})


# --- boots ---------------------------------------------------------------------------------


def boot(
    c: Campaign,
    rig: Rig,
    commands: list[str],
    *,
    words: tuple[str, ...] = (),
    kill: harness.KillAfter | None = None,
) -> harness.BootResult:
    """One boot of ``rig``: tt-check first (the previous cut's evidence), then ``commands``;
    the rig's PCR and recovery-key state carried; a pending cut resolved when the check ran."""
    from .bench_resize import rt_results

    m = rig.machine
    all_words = [LOUD, *([EXTEND] if rig.extended else []), *words]
    answers = [f"(try 1 of 3):={rig.recovery_key}"] if rig.recovery_key else []
    run = ";".join(["tt-check", *commands])
    result: harness.BootResult = m.boot(
        f"rt.run={run}", *all_words, answers=answers, kill_after=kill
    )
    rt = {tag: value for tag, value in rt_results(result.console)}
    check = plan.parse_check(result.console, rt)
    came_up = check.done
    if rig.pending is not None and (came_up or result.returncode != harness.KILLED):
        cut, row = rig.pending
        rig.pending = None
        stop = "" if came_up else f"{result.reason}: {plan.last_pystate_line(result.console)}"
        judged = plan.verdict(
            cut, came_up=came_up, stop=stop, check=check, expected=rig.expected, marks=rig.marks
        )
        seconds = float(str(row.pop("boot_seconds", 0.0))) + result.duration
        if not row.get("cut"):  # the boot ended before its instant: say so first
            judged["outcome"] = f"no cut; the boot after it {judged['outcome']}"
        detail = str(row.get("detail", "")) + initrd_fsck(result.console)
        if not judged["ok"]:
            detail += f"; next boot: console-{m.boots}.log in {m.work}"
        c.add({**row, **judged, "detail": detail, "seconds": round(seconds, 1)})
        rig.broken = not came_up
    if came_up:
        rig.expected = {}
        rig.marks.update(check.new_marks)
        if "inner" in check.marks and check.marks["inner"] != "absent":
            rig.marks["inner"] = check.marks["inner"]
        rig.recovery_key = check.recovery_key or rig.recovery_key
    rig.expected.update(plan.fsync_log(result.console))
    return result


def initrd_fsck(console: str) -> str:
    """What the next boot's initrd fsck said (``-p`` may preen what a cut left: allowed,
    SPEC §11.3, but worth seeing in the row)."""
    from .roots import boot_json

    report = boot_json(console) or {}
    steps = report.get("steps")
    if not isinstance(steps, list):
        return ""
    said = [
        f"{s['name']}: {s.get('detail')}"
        for s in steps
        if isinstance(s, dict) and s.get("name") in ("fsck", "inner-fsck")
    ]
    return "; next boot's " + ", ".join(said) if said else ""


def cut_boot(
    c: Campaign,
    rig: Rig,
    cut: Cut,
    window: Window,
    commands: list[str],
    *,
    words: tuple[str, ...] = (),
    detail: str = "",
) -> None:
    """The boot with the power cut; its verdict comes from the machine's next boot."""
    delay = window.delay(cut.fraction)
    kill = harness.KillAfter(window.anchor, delay)
    result = boot(c, rig, commands, words=words, kill=kill)
    killed = result.returncode == harness.KILLED
    injected = (
        f"SIGKILL {delay * 1000:.0f} ms after /{window.anchor}/ "
        f"({cut.fraction:.0%} of {window.span:.2f} s)"
        if killed
        else f"no cut: the boot ended first ({result.reason or 'powered off'})"
    )
    row: dict[str, object] = {
        "kind": cut.kind,
        "case": cut.case,
        "injected": injected,
        "cut": killed,
        "in_window": killed and plan.landed(cut, result.console),
        "cut_at_ms": round(delay * 1000) if killed else None,
        "window_ms": round(window.span * 1000),
        "cut_boot_s": None if result.killed_at is None else round(result.killed_at, 2),
        "detail": (detail + "; " if detail else "") + f"cut boot: console-{rig.machine.boots}.log",
        "boot_seconds": result.duration,
        "machine": rig.machine.name,
    }
    rig.pending = (cut, row)  # an uncut boot too: the next boot checks what it left


def verify(c: Campaign, rig: Rig) -> None:
    """A boot that only checks (and resolves the pending cut)."""
    if rig.pending is not None:
        boot(c, rig, [])


# --- the kinds -----------------------------------------------------------------------------


def rig_e(c: Campaign) -> Rig:
    """Machine E (inner ext4): its first boot provisions uncut, which measures the
    provisioning steps, and measures an online grow under the writer."""
    if "E" in c.rigs and not c.rigs["E"].broken:
        return c.rigs["E"]
    rig = new_rig(c, f"E{len(c.retired) or ''}", "ext4")
    if "E" in c.rigs:
        c.retired.append(c.rigs["E"])
    pristine = c.work / "factory.img"
    subprocess.run(
        ["cp", "--sparse=always", str(rig.machine.layout.path), str(pristine)], check=True
    )
    c.factory = (rig.machine.layout, pristine)
    c.rigs["E"] = rig
    c.say("machine E: first boot (provisions; measures provisioning and a grow)")
    result = boot(c, rig, [f"tt-grow,{rig.machine.boots + 1},{GROW_MIB}"])
    for step in plan.PROVISION_STEPS:
        window = plan.initrd_window(result.lines, step, step)
        if window is not None:
            c.windows[step] = window
    grow = plan.guest_window(result.lines, "grow")
    if grow is not None:
        rig.windows[plan.GROW] = grow
    c.say(f"windows: {describe_windows({**c.windows, **rig.windows})}")
    if not result.ok:
        c.say("machine E's first boot failed:\n" + harness.describe(result))
    return rig


def rig_b(c: Campaign) -> Rig:
    if "B" in c.rigs and not c.rigs["B"].broken:
        return c.rigs["B"]
    rig = new_rig(c, f"B{len(c.retired) or ''}", "btrfs")
    if "B" in c.rigs:
        c.retired.append(c.rigs["B"])
    c.rigs["B"] = rig
    c.say("machine B: first boot (provisions btrfs; measures an online shrink)")
    result = boot(c, rig, [f"tt-shrink,{rig.machine.boots + 1},{GROW_MIB}"])
    shrink = plan.guest_window(result.lines, "shrink")
    if shrink is not None:
        rig.windows[plan.BTRFS_SHRINK] = shrink
    if not result.ok:
        c.say("machine B's first boot failed:\n" + harness.describe(result))
    return rig


def describe_windows(windows: dict[str, Window]) -> str:
    return ", ".join(f"{k} {w.span * 1000:.0f} ms" for k, w in windows.items())


def skipped(c: Campaign, cut: Cut, why: str) -> None:
    c.add({
        "kind": cut.kind, "case": cut.case, "injected": "none", "cut": False, "ok": False,
        "outcome": f"not run: {why}", "detail": "", "seconds": 0.0,
    })  # fmt: skip


def run_provision(c: Campaign, cut: Cut) -> None:
    rig_e(c)
    window = c.windows.get(cut.step)
    if window is None:
        return skipped(c, cut, f"no window measured for {cut.step}")
    rig = provision_rig(c, cut.index)
    cut_boot(c, rig, cut, window, [])
    verify(c, rig)
    if not rig.broken:  # the consoles stay; a disk only where its next boot failed
        (rig.machine.work / "disk.img").unlink(missing_ok=True)
    return None


def run_booted(c: Campaign, cut: Cut) -> None:
    """An online grow (E) or btrfs shrink (B) under the writer, cut in the middle."""
    rig = rig_e(c) if cut.kind == plan.GROW else rig_b(c)
    window = rig.windows.get(cut.kind)
    if window is None:
        return skipped(c, cut, "no window measured")
    command = "tt-grow" if cut.kind == plan.GROW else "tt-shrink"
    cut_boot(c, rig, cut, window, [f"{command},{rig.machine.boots + 1},{GROW_MIB}"])
    return None


def run_offline(c: Campaign, cut: Cut) -> None:
    """Arm an ext4 shrink (grow, write, request), then cut the next boot's offline shrink."""
    rig = rig_e(c)
    if plan.OFFLINE_SHRINK not in rig.windows:
        boot(c, rig, [f"tt-arm-shrink,{rig.machine.boots + 1},{2 * GROW_MIB}"])
        result = boot(c, rig, [])  # the shrink, uncut: measured
        first, last = plan.INITRD_SPANS[cut.kind]
        window = plan.initrd_window(result.lines, first, last)
        if window is None:
            return skipped(c, cut, "the uncut boot did no offline shrink")
        rig.windows[cut.kind] = window
    result = boot(c, rig, [f"tt-arm-shrink,{rig.machine.boots + 1},{2 * GROW_MIB}"])
    from .bench_resize import rt_result

    armed = rt_result(result.console, "TT-ARMED") or {}
    cut_boot(c, rig, cut, rig.windows[cut.kind], [], detail=f"request armed: {armed.get('armed')}")
    return None


def run_reseal(c: Campaign, cut: Cut) -> None:
    """A boot with PCR 7 changed (extended, or no longer): the recovery key, then the re-seal
    to the new PCR 7, cut."""
    rig = rig_e(c)
    verify(c, rig)
    if plan.RESEAL not in rig.windows:
        rig.extended = not rig.extended
        result = boot(c, rig, [])
        first, last = plan.INITRD_SPANS[cut.kind]
        window = plan.initrd_window(result.lines, first, last)
        if window is None:
            return skipped(c, cut, "the uncut boot did not re-seal")
        rig.windows[cut.kind] = window
    rig.extended = not rig.extended
    cut_boot(c, rig, cut, rig.windows[cut.kind], [], detail=f"PCR 7 extended: {rig.extended}")
    return None


def run_reset(c: Campaign, cut: Cut) -> None:
    """A factory reset (the word alone: machine E's initrd has factory-reset-request = none),
    cut."""
    rig = rig_e(c)
    verify(c, rig)
    if plan.FACTORY_RESET not in rig.windows:
        result = boot(c, rig, [], words=(RESET,))
        first, last = plan.INITRD_SPANS[cut.kind]
        window = plan.initrd_window(result.lines, first, last)
        if window is None:
            return skipped(c, cut, "the uncut boot did not reset")
        rig.windows[cut.kind] = window
    cut_boot(c, rig, cut, rig.windows[cut.kind], [], words=(RESET,))
    return None


RUNNERS = {
    plan.PROVISION: run_provision,
    plan.GROW: run_booted,
    plan.BTRFS_SHRINK: run_booted,
    plan.OFFLINE_SHRINK: run_offline,
    plan.RESEAL: run_reseal,
    plan.FACTORY_RESET: run_reset,
}


def run_power_cuts(c: Campaign, cuts: list[Cut]) -> None:
    for cut in cuts:
        c.say(f"cut {cut.index}/{len(cuts)}: {cut.kind} {cut.case}")
        RUNNERS[cut.kind](c, cut)
    for rig in c.rigs.values():
        if not rig.broken:
            verify(c, rig)


# --- the table -----------------------------------------------------------------------------


def summary(rows: list[dict[str, object]]) -> dict[str, int]:
    """The campaign's figures, over the power-cut rows."""
    cuts = [r for r in rows if str(r["kind"]).startswith("cut-")]
    made = [r for r in cuts if r.get("cut")]
    return {
        "cuts_made": len(made),
        "in_window": sum(1 for r in made if r.get("in_window")),
        "came_up": sum(1 for r in made if r.get("came_up")),
        "fsynced_files": sum(int(str(r.get("fsynced_files") or 0)) for r in made),
        "lost_files": sum(int(str(r.get("lost_files") or 0)) for r in made),
        "fsck_clean": sum(1 for r in made if r.get("fsck_clean")),
        "reformats": sum(1 for r in made if r.get("reformatted")),
        "failed_rows": sum(1 for r in rows if not r.get("ok")),
    }


def per_kind(rows: list[dict[str, object]]) -> str:
    """The figures by kind: cuts made, came up, fsync'd files and lost, fsck clean, reformats."""
    head = ("kind", "cuts made", "in window", "came up", "fsync'd files", "lost", "fsck clean",
            "reformats")  # fmt: skip
    keys = ("cuts_made", "in_window", "came_up", "fsynced_files", "lost_files", "fsck_clean",
            "reformats")  # fmt: skip
    body = []
    for kind in sorted({str(r["kind"]) for r in rows}):
        f = summary([r for r in rows if r["kind"] == kind])
        body.append((kind, *(str(f[k]) for k in keys)))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def table(rows: list[dict[str, object]]) -> str:
    head = ("kind", "case", "injected", "ok", "outcome", "s")
    body = [
        (
            str(r["kind"]),
            str(r["case"]),
            str(r.get("injected", ""))[:60],
            "ok" if r["ok"] else "FAIL",
            str(r["outcome"])[:90],
            f"{float(str(r.get('seconds') or 0)):.0f}",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *body]
    ]
    return "\n".join(lines)


def write_json(path: Path, rows: list[dict[str, object]], **extra: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"summary": summary(rows), **extra, "rows": rows}, indent=1))
    tmp.rename(path)


# --- the command ---------------------------------------------------------------------------


def campaign(
    seed: int,
    cuts: int,
    only: set[str] | None,
    work: Path,
    json_path: Path | None,
    *,
    echo: bool = True,
) -> tuple[list[dict[str, object]], int]:
    """Run the campaign; the rows and an exit status (0: every row ok)."""
    from . import torture_faults as faults  # here: its imports are not needed for cuts alone

    power = [k for k in plan.KINDS if only is None or k in only]
    other = set() if only is None else only - set(plan.KINDS)
    fault_names = set(faults.KINDS) | {c.name for c in faults.CASES}
    if other - fault_names:
        unknown = sorted(other - fault_names)
        print(f"torture: unknown kind(s): {', '.join(unknown)}", file=sys.stderr)
        return [], 2
    rows: list[dict[str, object]] = []
    status = 0
    started = time.monotonic()
    if power:
        fs = {"btrfs"} if power == [plan.BTRFS_SHRINK] else {"ext4"}
        if plan.BTRFS_SHRINK in power:
            fs.add("btrfs")
        work.mkdir(parents=True, exist_ok=True)
        root, initrds = build(fs)
        c = Campaign(work, root, initrds, json_path=json_path, echo=echo)
        try:
            run_power_cuts(c, plan.schedule(seed, cuts, power))
        finally:
            rows = c.rows
    if only is None or other:
        # A kind runs all its cases, a case name (e.g. tpm's retry-always) only that case.
        rows += faults.run(set(faults.KINDS), random.Random(seed), work / "faults", other)
    if json_path is not None:
        write_json(json_path, rows, seed=seed, cuts=cuts,
                   seconds=round(time.monotonic() - started), cache=DISK_CACHE)  # fmt: skip
    return rows, status or (0 if all(r["ok"] for r in rows) else 1)


def _cmd(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    rows, status = campaign(
        args.seed, args.cuts, set(args.only) if args.only else None, args.work, args.json
    )
    print(table(rows))
    figures = summary(rows)
    print(per_kind(rows))
    print("torture: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items()))
    print(f"torture: seed {args.seed}, {time.monotonic() - t0:.0f} s")
    return status


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "torture", help="power cuts at random instants, disk and TPM faults (QEMU; a campaign)"
    )
    p.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    p.add_argument("--cuts", type=int, default=40, help="power cuts in all (default 40)")
    p.add_argument(
        "--only", action="append", metavar="KIND",
        help=f"run only this kind (repeatable): {', '.join(plan.KINDS)}, or a fault kind or case",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="write the table as JSON too")
    p.add_argument("--work", type=Path, default=OUT / "torture", help="machines, builds, logs")
    p.set_defaults(func=_cmd)
