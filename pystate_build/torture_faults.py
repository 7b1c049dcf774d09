"""Fault torture (issue 14, point 1): disk I/O errors, a misbehaving TPM, both areas full.

``run(kinds, rng, work)`` boots QEMU machines (TCG, swtpm, the systemd initrd with pystate,
the resize guest root with /rt/rt.py = guest_faults.py) and returns one row per case:
``kind, case, injected, outcome, ok, detail, seconds``.

- ``disk``: one provisioned machine (its disk and swtpm state copied per case) boots with
  QEMU's blkdebug failing reads of the GPT, of the LUKS2 header, of the inner file system,
  writes of a grow; a copy of the factory-fresh disk with writes of provisioning failing.
- ``tpm``: the same machine with swtpm killed at the unseal, in real dictionary-attack
  lockout, with TPM_RC_LOCKOUT / _RETRY / _YIELDED forged by tpm_proxy, and with no TPM.
  A prompt is answered with the recovery key the provisioning boot showed.
- ``full``: a machine per outer file system (ext4, btrfs, xfs) whose first boot provisions,
  then fills /home and /var to ENOSPC at once while files in the image are rewritten.

Each row is checked by fault_verdict (no traceback, no reformat, no new key, nothing lost).
``python -m pystate_build.torture_faults [--seed N] [--only KIND|CASE]…`` prints the table
and the JSON; docs/reliability.md ("Disk and TPM faults, full areas") has the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import blkdebug, fault_host, fault_verdict, tpm_proxy
from . import qemu_harness as harness
from .qemu_machine import Machine

KINDS = ("disk", "tpm", "full")
MIB = 1 << 20
STATE_SIZE = 1 << 30
TIMEOUT = 420.0
FULL_TIMEOUT = 900.0

# What a case's boot gave: the boot, what the verdict looks at, a note on the injection.
Ran = tuple[harness.BootResult, fault_verdict.Seen, str]


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    allowed: tuple[str, ...]
    run: Callable[[Lab, str], Ran]


class Lab:
    """The shared pieces under ``work``: initrd, guest root, the provisioned machine."""

    def __init__(self, work: Path, rng: random.Random) -> None:
        self.work = work.resolve()
        self.rng = rng
        self.work.mkdir(parents=True, exist_ok=True)
        self._golden: Machine | None = None
        self.golden_identity: fault_host.Identity | None = None

    @functools.cached_property
    def initrd(self) -> Path:
        from .bench_resize import build_initrd_for

        path = self.work / "initrd-ext4.img"
        return path if path.exists() else build_initrd_for(self.work, path)

    @functools.cached_property
    def root(self) -> Path:
        from .bench_resize import build_guest_root

        root = self.work / "root"
        if not (root / "rt").is_dir():
            build_guest_root(root, self.work)
        here = Path(__file__).parent
        shutil.copy2(here / "guest_resize.py", root / "rt/rt_resize.py")
        shutil.copy2(here / "guest_faults.py", root / "rt/rt.py")
        return root

    def fresh(self, name: str, state_fs: str = "ext4") -> Machine:
        """A factory-fresh machine: a GPT disk with an empty state partition (a plain
        /home marker on it), no TPM state yet."""
        from .disk import build_disk

        mdir = self.work / name
        if mdir.exists():
            shutil.rmtree(mdir)
        (mdir / "state/home").mkdir(parents=True)
        marker = f"torture {name} {self.rng.getrandbits(64):016x}\n"
        (mdir / "state" / fault_host.HOME_MARKER).write_text(marker)
        layout = build_disk(
            mdir / "disk.img", self.root, mdir / "state", state_fs=state_fs,
            state_size=STATE_SIZE,
        )  # fmt: skip
        return Machine(
            name, layout, self.initrd, mdir, expect=(fault_verdict.DONE,), timeout=TIMEOUT,
            memory=1024,
        )  # fmt: skip

    def golden(self) -> Machine:
        """The provisioned machine every disk and tpm case starts from (made once)."""
        if self._golden is None:
            m = self.fresh("golden")
            copy(m.layout.path, self.work / "fresh.img")
            result = m.run("marker", "MARKER")
            if not result.ok:
                raise RuntimeError("provisioning boot failed\n" + harness.describe(result))
            m.recovery_key = str(m.results["MARKER"]["recovery_key"]).splitlines()[0]
            self.golden_identity = fault_host.identity(m.layout)
            self._golden = m
        return self._golden

    def clone(self, case: str, *, fresh_disk: bool = False) -> Machine:
        """A copy of the golden machine (its disk and TPM) for one case."""
        g = self.golden()
        mdir = self.work / "cases" / case
        if mdir.exists():
            shutil.rmtree(mdir)
        mdir.mkdir(parents=True)
        copy(self.work / "fresh.img" if fresh_disk else g.layout.path, mdir / "disk.img")
        if not fresh_disk:
            shutil.copytree(g.tpm, mdir / "tpm")
        layout = dataclasses.replace(g.layout, path=mdir / "disk.img")
        m = Machine(case, layout, self.initrd, mdir, expect=(), timeout=TIMEOUT)
        m.recovery_key = g.recovery_key
        return m


def copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def _answers(m: Machine) -> list[str]:
    """The recovery prompt answered with the right key (the guest then checks the marker)."""
    return [f"(try 1 of 3):={m.recovery_key}"]


def _marker_problems(result: harness.BootResult, lab: Lab, *, fresh: bool = False) -> list[str]:
    """The guest's marker check against the provisioned machine's (a fresh machine makes
    its own)."""
    from .bench_resize import rt_result

    marker = rt_result(result.console, "MARKER")
    if marker is None or fresh:
        return []
    golden = lab.golden().results["MARKER"]
    problems = []
    if marker["marker"] != golden["marker"]:
        problems.append(f"the marker inside the image is {marker['marker']}")
    if marker["created"]:
        problems.append("the marker inside the image was missing (a new image?)")
    return problems


def _next_boot(lab: Lab, m: Machine, *, fresh: bool = False) -> tuple[str, list[str]]:
    """After a disk fault, the same disk boots once more without it: it must come back
    (a provisioning fault: provision), with the marker of before."""
    result = m.boot("rt.run=marker", answers=_answers(m), expect=())
    problems = _marker_problems(result, lab, fresh=fresh)
    if fault_verdict.TRACEBACK in result.console:
        problems.append("the next boot printed a traceback")
    if fault_verdict.DONE not in result.console:
        problems.append(
            "the next boot did not come back: " + fault_verdict.pystate_line(result.console)
        )
    return ("next boot " + ("ok" if not problems else "FAILED")), problems


def _seen(
    lab: Lab, m: Machine, result: harness.BootResult, problems: Iterable[str] = (), *,
    fresh: bool = False,
) -> fault_verdict.Seen:  # fmt: skip
    before = {} if fresh else dataclasses.asdict(lab.golden_identity or fault_host.identity(
        lab.golden().layout))  # fmt: skip
    if fresh:
        before = {"home_marker": (lab.work / "golden/state" / fault_host.HOME_MARKER).read_text()}
    after = dataclasses.asdict(fault_host.identity(m.layout))
    return fault_verdict.Seen(
        result.console, result.returncode == harness.TIMEOUT, before, after,
        [*problems, *_marker_problems(result, lab, fresh=fresh)], fresh,
    )  # fmt: skip


# --- disk --------------------------------------------------------------------------------


def _image_rules(lab: Lab, event: str, start: int, length: int) -> list[blkdebug.Injection]:
    """Rules failing ``event`` on bytes [start, start+length) of the golden encrypted.img."""
    g = lab.golden()
    assert g.layout.state is not None
    extents = fault_host.image_extents(g.layout)
    rules = []
    for offset, size in fault_host.disk_ranges(extents, g.layout.state.start, start, length):
        rules += blkdebug.covering(event, offset, size)
    return rules


def _disk_boot(
    lab: Lab, case: str, rules: list[blkdebug.Injection], commands: str, *,
    fresh: bool = False, words: tuple[str, ...] = (), must_say: str = "",
) -> Ran:  # fmt: skip
    m = lab.clone(case, fresh_disk=fresh)
    conf = blkdebug.write_config(m.work / "blkdebug.conf", rules)
    result = m.boot(
        f"rt.run={commands}", *words, answers=_answers(m), expect=(), blkdebug={0: conf}
    )
    problems = []
    if must_say and must_say not in result.console:
        problems.append(f"pystate did not say {must_say!r}")
    from .bench_resize import rt_result

    grow = rt_result(result.console, "GROW")
    if grow is not None and grow["bad"]:
        problems.append(f"fsync'd files read back wrong: {grow['bad']}")
    note = f"{len(rules)} rule(s)"
    if grow is not None:
        note += (
            f"; grow: {grow['files']} files fsync'd and read back, then {grow['failure']}, "
            f"service exit {grow['service_status']}"
        )
    seen = _seen(lab, m, result, problems, fresh=fresh)
    after, next_problems = _next_boot(lab, m, fresh=fresh)
    seen = dataclasses.replace(seen, problems=[*seen.problems, *next_problems])
    return result, seen, f"{note}; {after}"


def case_gpt_read(lab: Lab, case: str) -> Ran:
    # The disk's first 4 KiB (protective MBR, primary GPT header) unreadable for good; the
    # backup is at the disk's end. Two things before pystate would stop such a boot, and
    # neither is pystate's: the kernel refuses a disk whose protective MBR it cannot read
    # (``gpt`` makes it take the backup GPT), and udev's blkid cannot read the partition
    # table either, so no /dev/disk/by-partuuid link and no root=PARTUUID= (the root is
    # named by its kernel device instead; the last root= on the command line wins).
    root = lab.golden().layout.root
    assert root is not None
    rules = [blkdebug.Injection("read_aio", sector) for sector in range(8)]
    words = ("gpt", f"root=/dev/vda{root.number}")
    # pystate's own part: the boot report names the backup it took (formats/gpt.py).
    return _disk_boot(lab, case, rules, "marker", words=words, must_say="using the backup")


def case_luks_header_read(lab: Lab, case: str) -> Ran:
    # The primary LUKS2 header copy (binary header and JSON area, 16 KiB) unreadable.
    return _disk_boot(lab, case, _image_rules(lab, "read_aio", 0, 16 << 10), "marker")


def case_inner_fs_read(lab: Lab, case: str) -> Ran:
    # The inner file system's first block (its superblock) unreadable.
    lab.golden()
    assert lab.golden_identity is not None and lab.golden_identity.data_offset is not None
    rules = _image_rules(lab, "read_aio", lab.golden_identity.data_offset, 4096)
    return _disk_boot(lab, case, rules, "marker")


def case_provision_write(lab: Lab, case: str) -> Ran:
    # A factory-fresh copy: writes fail where the provisioned machine's image header went
    # (the same file system image allocates the same blocks).
    rules = _image_rules(lab, "write_aio", 0, 1 << 20)
    return _disk_boot(lab, case, rules, "marker", fresh=True)


def case_grow_write(lab: Lab, case: str) -> Ran:
    # Writes fail on the 64 MiB after the image's last extent, where a grow's allocation goes.
    g = lab.golden()
    assert g.layout.state is not None
    extents = fault_host.image_extents(g.layout)
    _, physical, size = max(extents, key=lambda e: e[1] + e[2])
    rules = blkdebug.covering("write_aio", g.layout.state.start + physical + size, 64 * MIB)
    return _disk_boot(lab, case, rules, "marker;grow,320")


# --- tpm ---------------------------------------------------------------------------------


def _tpm_boot(
    lab: Lab, case: str, fault: tpm_proxy.Fault | None, *, tpm: bool = True,
    lockout: bool = False,
) -> Ran:  # fmt: skip
    m = lab.clone(case)
    note = ""
    if lockout:
        note = fault_host.da_lockout(m.tpm)
    counter = tpm_proxy.Counter()
    wrap = None
    if fault is not None:
        wrap = functools.partial(_proxy, fault=fault, counter=counter)
    result = m.boot("rt.run=marker", tpm=tpm, answers=_answers(m), expect=(), tpm_proxy=wrap)
    if fault is not None:
        note = "; ".join(counter.log[:2]) + (
            f" (+{counter.forged - 2})" if counter.forged > 2 else ""
        )
        if not counter.forged:
            note = f"never forged: commands {sorted(hex(c) for c in counter.commands)}"
    return result, _seen(lab, m, result), note


def _proxy(sock: Path, *, fault: tpm_proxy.Fault, counter: tpm_proxy.Counter):  # type: ignore[no-untyped-def]
    return tpm_proxy.proxy(sock, fault, counter)


def _fault_case(
    fault: tpm_proxy.Fault,
) -> Callable[[Lab, str], Ran]:
    return lambda lab, case: _tpm_boot(lab, case, fault)


def case_no_tpm(lab: Lab, case: str) -> Ran:
    return _tpm_boot(lab, case, None, tpm=False)


def case_da_lockout(lab: Lab, case: str) -> Ran:
    return _tpm_boot(lab, case, None, lockout=True)


# --- full --------------------------------------------------------------------------------


def _full_case(
    state_fs: str,
) -> Callable[[Lab, str], Ran]:
    def run_full(lab: Lab, case: str) -> Ran:
        from .bench_resize import rt_result

        m = lab.fresh(f"full-{state_fs}", state_fs)
        before = {"home_marker": (m.work / "state" / fault_host.HOME_MARKER).read_text()}
        m.timeout = FULL_TIMEOUT
        result = m.boot("rt.run=marker;full,600", expect=())
        full = rt_result(result.console, "FULL")
        problems = full_problems(full)
        note = full_note(full) if full is not None else ""
        after = dataclasses.asdict(fault_host.identity(m.layout))
        fsck = outer_fsck(m, state_fs)
        if fsck:
            problems.append(fsck)
        seen = fault_verdict.Seen(
            result.console, result.returncode == harness.TIMEOUT, before, after, problems,
            fresh=True,
        )  # fmt: skip
        return result, seen, note

    return run_full


def full_note(full: dict[str, Any]) -> str:
    """What the guest's FULL result measured, in one line (pure)."""
    start, end = full["start"], full["end"]
    return (
        f"home from {full.get('home_started')} s: {full['home_files'] * 8} MiB "
        f"({full['home_error']}), var {full['var_files'] * 8} MiB ({full['var_error']}), "
        f"{full['rewrites']} rewrite rounds, image {start['image'] // MIB}->"
        f"{end['image'] // MIB} MiB ({len(full['images'])} sizes seen), outer free "
        f"{end['outer_free'] // MIB} MiB, reserve {int(full['reserve']) // MIB} MiB, "
        f"inner fsck {full['fsck']['status']}"
    )


def full_problems(full: dict[str, object] | None) -> list[str]:
    """What the guest's FULL result says went wrong (pure)."""
    if full is None:
        return ["the guest printed no RT-FULL"]
    problems = []
    for who in ("home_error", "var_error"):
        if full[who] != "ENOSPC":
            problems.append(f"{who.split('_')[0]} writer ended with {full[who]}, not ENOSPC")
    if full["rewrite_errors"]:
        problems.append(f"rewrites in place failed: {full['rewrite_errors']}")
    if full["lost"]:
        problems.append(f"fsync'd data read back wrong: {full['lost']}")
    if full["errors"]:
        problems.append(f"kernel: {full['errors'][:3]}")  # type: ignore[index]
    if full["reserve_broken"]:
        problems.append("the image grew while the outer fs was below its reserve")
    if full["fsck"]["status"] != 0:  # type: ignore[index]
        problems.append(f"inner fsck {full['fsck']}")
    if full["timed_out"]:
        problems.append("the writers never reached ENOSPC")
    return problems


def outer_fsck(m: Machine, state_fs: str) -> str:
    """The outer file system checked read-only on the host; '' when clean."""
    assert m.layout.state is not None
    argv = {
        "ext4": ["e2fsck", "-f", "-n"],
        "btrfs": ["btrfs", "check", "--readonly"],
        "xfs": ["xfs_repair", "-n"],
    }[state_fs]
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(m.layout.state.start),
         "--sizelimit", str(m.layout.state.size), str(m.layout.path)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        # A journal left by the power-off is replayed by a mount first (xfs_repair refuses
        # a dirty log, e2fsck -n would report the unreplayed journal).
        with fault_host.state_mounted(m.layout):
            pass
        proc = subprocess.run([*argv, loop], capture_output=True, text=True, check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    if proc.returncode == 0:
        return ""
    return f"outer {' '.join(argv)} exited {proc.returncode}: " + " | ".join(
        (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    )


# --- the cases ----------------------------------------------------------------------------

OK_DISK = (fault_verdict.RECOVERED, fault_verdict.STOPPED)
OK_PROMPT = ("prompt+recovered",)
CASES = (
    Case("disk", "gpt-read", OK_DISK, case_gpt_read),
    Case("disk", "luks-header-read", OK_DISK, case_luks_header_read),
    Case("disk", "inner-fs-read", (fault_verdict.STOPPED,), case_inner_fs_read),
    Case("disk", "provision-write", OK_DISK, case_provision_write),
    Case("disk", "grow-write", (fault_verdict.RECOVERED,), case_grow_write),
    Case("tpm", "swtpm-killed-at-unseal", OK_PROMPT,
         _fault_case(tpm_proxy.Fault(tpm_proxy.CC_UNSEAL, tpm_proxy.KILL))),
    Case("tpm", "da-lockout", (fault_verdict.RECOVERED,), case_da_lockout),
    Case("tpm", "lockout-forged", OK_PROMPT,
         _fault_case(tpm_proxy.Fault(tpm_proxy.CC_UNSEAL, tpm_proxy.RC_LOCKOUT, times=0))),
    Case("tpm", "retry-once", (fault_verdict.RECOVERED,),
         _fault_case(tpm_proxy.Fault(tpm_proxy.CC_UNSEAL, tpm_proxy.RC_RETRY))),
    Case("tpm", "retry-always", OK_PROMPT,
         _fault_case(tpm_proxy.Fault(tpm_proxy.CC_UNSEAL, tpm_proxy.RC_RETRY, times=0))),
    Case("tpm", "yielded-always", OK_PROMPT,
         _fault_case(tpm_proxy.Fault(tpm_proxy.CC_LOAD, tpm_proxy.RC_YIELDED, times=0))),
    Case("tpm", "no-tpm", OK_PROMPT, case_no_tpm),
    Case("full", "full-ext4", (fault_verdict.RECOVERED,), _full_case("ext4")),
    Case("full", "full-btrfs", (fault_verdict.RECOVERED,), _full_case("btrfs")),
    Case("full", "full-xfs", (fault_verdict.RECOVERED,), _full_case("xfs")),
)  # fmt: skip


def row(case: Case, seen: fault_verdict.Seen, note: str, seconds: float) -> dict[str, object]:
    """One result row (pure): the verdict of what was seen."""
    result, ok, detail = fault_verdict.verdict(seen, case.allowed)
    count = fault_verdict.injected(seen.console)
    injected = f"{count} I/O error(s)" if case.kind == "disk" else ""
    if note:
        injected = f"{injected}; {note}" if injected else note
    return {
        "kind": case.kind,
        "case": case.name,
        "injected": injected,
        "outcome": result,
        "ok": ok,
        "detail": detail,
        "seconds": round(seconds, 1),
    }


def select(kinds: set[str], only: Iterable[str] = ()) -> list[Case]:
    """The cases of ``kinds``; ``only`` (kinds or case names) narrows them further."""
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kind(s) {sorted(unknown)}: {', '.join(KINDS)}")
    wanted = set(only)
    return [
        c for c in CASES
        if c.kind in kinds and (not wanted or c.kind in wanted or c.name in wanted)
    ]  # fmt: skip


def run(
    kinds: set[str], rng: random.Random, work: Path, only: Iterable[str] = ()
) -> list[dict[str, object]]:
    """Every case of ``kinds`` (in an order drawn from ``rng``), one row each."""
    lab = Lab(work, rng)
    cases = select(kinds, only)
    rng.shuffle(cases)
    rows = []
    for case in cases:
        t0 = time.monotonic()
        try:
            _, seen, note = case.run(lab, case.name)
            rows.append(row(case, seen, note, time.monotonic() - t0))
        except Exception as exc:  # a harness failure is a row too, not the end of the run
            rows.append({
                "kind": case.kind, "case": case.name, "injected": "", "outcome": "error",
                "ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300],
                "seconds": round(time.monotonic() - t0, 1),
            })  # fmt: skip
        print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


COLUMNS = ("kind", "case", "outcome", "ok", "seconds", "injected", "detail")


def format_row(r: dict[str, object]) -> str:
    return " | ".join(str(r[c]) for c in COLUMNS)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + format_row(r).replace("\n", " ") + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from . import OUT

    p = argparse.ArgumentParser(prog="torture_faults", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--only", action="append", default=[], help="a kind or a case; repeatable")
    p.add_argument("--work", type=Path, default=OUT / "torture-faults")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    known = set(KINDS) | {c.name for c in CASES}
    unknown = [o for o in args.only if o not in known]
    if unknown:
        p.error(f"--only {unknown[0]}: not a kind or case ({', '.join(sorted(known))})")
    rows = run(set(KINDS), random.Random(args.seed), args.work, args.only)
    print(table(rows))
    text = json.dumps(rows, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
