"""build.py torture, the pure part: the cut schedule, the windows, the console's evidence and
the verdict of a cut (no I/O; tests/test_torture.py checks it on the host).

A cut is a kind (what was under way), for provisioning the step it falls in, and a fraction
of that kind's window: the campaign turns the fraction into milliseconds after an anchor
line with the window an uncut boot measured. So a seed fixes the schedule; the instants in
ms follow the machine's speed, as measured.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# What is under way when the power goes. Each runs on a machine of pystate_build.torture:
# "provision" on a fresh copy of a factory disk, the ext4 kinds on machine E, btrfs on B.
PROVISION = "cut-provision"
GROW = "cut-grow"
BTRFS_SHRINK = "cut-btrfs-shrink"
OFFLINE_SHRINK = "cut-offline-shrink"
RESEAL = "cut-reseal"
FACTORY_RESET = "cut-factory-reset"
KINDS: tuple[str, ...] = (PROVISION, GROW, BTRFS_SHRINK, OFFLINE_SHRINK, RESEAL, FACTORY_RESET)

# Provisioning's steps as boot.json names them (layout: the default layout and seeding).
PROVISION_STEPS = ("seal", "luks-format", "mkfs", "layout", "commit")
# The initrd's spans the other initrd kinds cut into: (first step, last step).
INITRD_SPANS = {
    OFFLINE_SHRINK: ("offline-shrink", "offline-shrink"),
    RESEAL: ("reseal", "reseal"),
    FACTORY_RESET: ("reset-begin", "reset-end"),
}
# The booted kinds: the guest echoes the resize's output as it comes (its decision, then
# the steps), and TT-RESIZED when the command is over.
DECISION = r"^(\[[ 0-9.]+\] *)?TT-RESIZE {action} \d"
RESIZED_LINE = "TT-RESIZED"
STEPS_TOOK = re.compile(r"^TT-RESIZE (?:grow|shrink) .* in ([0-9.]+) s \(")

STEP_DONE = re.compile(r"pystate: (\S+) done in [0-9.]+ ms")
FSYNC = re.compile(r"TT-FSYNC (\S+) ([0-9a-f]{64})\b")
HAVE = re.compile(r"^TT-HAVE (\S+) ([0-9a-f]{64})$")
HAVE_END = re.compile(r"^TT-HAVE-END (\d+)$")
MARK = re.compile(r"^TT-MARK(-NEW)? (inner|outer) (absent|[0-9a-f]{64})$")
RECOVERY = re.compile(r"^TT-RECOVERY ([cbdefghijklnrtuv-]{71})$")
TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s*")


@dataclass(frozen=True)
class Cut:
    """One power cut of the campaign: number, kind, provisioning step (else ""), and the
    instant as a fraction of the kind's window."""

    index: int
    kind: str
    step: str
    fraction: float

    @property
    def case(self) -> str:
        where = f"{self.step} " if self.step else ""
        return f"#{self.index} {where}at {self.fraction:.0%}"


def schedule(seed: int, cuts: int, kinds: Sequence[str] = KINDS) -> list[Cut]:
    """``cuts`` cuts spread evenly over ``kinds`` (the first ``cuts % len(kinds)`` of a
    seeded shuffle get one more), in a seeded order; same seed, same list."""
    if not kinds:
        return []
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    plan: list[str] = []
    for i, kind in enumerate(order):
        plan += [kind] * (cuts // len(order) + (i < cuts % len(order)))
    rng.shuffle(plan)
    result = []
    for index, kind in enumerate(plan, 1):
        step = rng.choice(PROVISION_STEPS) if kind == PROVISION else ""
        result.append(Cut(index, kind, step, round(rng.random(), 4)))
    return result


@dataclass(frozen=True)
class Window:
    """Cut ``fraction * span`` seconds after the first console line matching ``anchor``."""

    anchor: str
    span: float

    def delay(self, fraction: float) -> float:
        return fraction * self.span


def _clean(line: str) -> str:
    return TIMESTAMP.sub("", line.strip())


def step_lines(lines: Iterable[tuple[float, str]]) -> list[tuple[float, str]]:
    """(arrival, step) of the initrd's ``pystate: STEP done in N ms`` lines, in order."""
    found = []
    for at, line in lines:
        match = STEP_DONE.search(line)
        if match:
            found.append((at, match.group(1)))
    return found


def initrd_window(lines: Iterable[tuple[float, str]], first: str, last: str) -> Window | None:
    """The span from the end of the step before ``first`` to the end of ``last``, anchored on
    that previous step's line, as an uncut boot's console shows it; None if not there."""
    steps = step_lines(lines)
    names = [name for _, name in steps]
    if first not in names or names.index(first) == 0:
        return None
    begin = names.index(first)
    after_first = names[begin:]
    if last not in after_first:
        return None
    end = begin + after_first.index(last)
    previous_at, previous = steps[begin - 1]
    return Window(rf"pystate: {re.escape(previous)} done in", steps[end][0] - previous_at)


def guest_window(lines: Iterable[tuple[float, str]], action: str) -> Window | None:
    """From the resize's decision line (``TT-RESIZE grow …``, ``action`` grow or shrink,
    printed just before its steps) for as long as its steps took: the seconds of its
    change line (``… in 0.22 s (…)``), else the time to the guest's TT-RESIZED line. (The
    command's exit after its steps, a Python teardown, is not part of the window; the
    btrfs shrink's uncut grow before it is not either.)"""
    go = resized = None
    decision = re.compile(DECISION.format(action=action))
    for at, line in lines:
        text = _clean(line)
        if go is None and decision.match(text):
            go = at
        elif go is not None and (took := STEPS_TOOK.match(text)):
            return Window(decision.pattern, float(took.group(1)))
        elif go is not None and text.startswith(RESIZED_LINE):
            resized = at
            break
    if go is None or resized is None:
        return None
    return Window(decision.pattern, resized - go)


def landed(cut: Cut, console: str) -> bool:
    """Whether a killed boot died inside the window (its end had not been printed): the
    window comes from another boot, and boots differ in speed, so a late fraction may fall
    after the resize or the step ended."""
    if cut.kind in (GROW, BTRFS_SHRINK):
        action = "grow" if cut.kind == GROW else "shrink"
        text = [_clean(line) for line in console.splitlines()]
        decision = re.compile(DECISION.format(action=action))
        starts = [i for i, line in enumerate(text) if decision.match(line)]
        return bool(starts) and not any(
            line.startswith(RESIZED_LINE) for line in text[starts[-1] :]
        )
    last = cut.step if cut.kind == PROVISION else INITRD_SPANS[cut.kind][1]
    return f"pystate: {last} done in" not in console


def fsync_log(console: str) -> dict[str, str]:
    """The writer's log: every file whose fsync (data and directory) had returned when the
    line left the guest, name -> sha256."""
    return {m.group(1): m.group(2) for m in FSYNC.finditer(console)}


@dataclass
class Check:
    """What a boot's tt-check printed (see guest_resize.cmd_tt_check)."""

    have: dict[str, str] | None = None  # None: the list did not arrive whole
    marks: dict[str, str] = field(default_factory=dict)  # outer/inner -> sha or "absent"
    new_marks: dict[str, str] = field(default_factory=dict)  # made at this check
    recovery_key: str = ""
    image: dict[str, object] | None = None
    fsck: dict[str, dict[str, object]] | None = None
    done: bool = False  # TT-CHECKED arrived


def parse_check(console: str, rt: dict[str, dict[str, object]]) -> Check:
    """The check's lines from a console; ``rt``: its RT-<tag> results by tag."""
    check = Check(image=rt.get("TT-IMAGE"), done="TT-CHECKED" in rt)
    fsck = rt.get("TT-FSCK")
    check.fsck = {k: v for k, v in fsck.items() if isinstance(v, dict)} if fsck else None
    have: dict[str, str] = {}
    for raw in console.splitlines():
        line = _clean(raw)
        if m := HAVE.match(line):
            have[m.group(1)] = m.group(2)
        elif (m := HAVE_END.match(line)) and int(m.group(1)) == len(have):
            check.have = have
        elif m := MARK.match(line):
            (check.new_marks if m.group(1) else check.marks)[m.group(2)] = m.group(3)
        elif m := RECOVERY.match(line):
            check.recovery_key = m.group(1)
    return check


def fsck_clean(check: Check) -> bool:
    """Both file systems checked and clean (e2fsck -n / btrfs check: status 0)."""
    if check.fsck is None:
        return False
    return all(check.fsck.get(fs, {}).get("status") == 0 for fs in ("inner", "outer"))


def verdict(
    cut: Cut,
    *,
    came_up: bool,
    stop: str,
    check: Check,
    expected: dict[str, str],
    marks: dict[str, str],
) -> dict[str, object]:
    """A cut's row, from the boot after it: it came up (``stop``: the reason it did not),
    one complete image, every fsync'd file (``expected``) intact, both fsck clean, the
    markers (``marks``: their sha256 before the cut) kept. A factory reset may lose the
    inner marker and every file, but only all of them (a complete reset); a provisioning
    cut has no inner marker yet."""
    lost = sorted(
        name
        for name, digest in expected.items()
        if check.have is None or check.have.get(name) != digest
    )
    problems = []
    if not came_up or not check.done:
        problems.append(f"did not come up: {stop or 'no check in the next boot'}")
    image = check.image or {}
    if came_up and check.done and not (image.get("img") and image.get("mounted")):
        problems.append("no complete image unlocked")
    if image.get("new"):
        problems.append("encrypted.img.new left over")
    if image.get("unnamed_keyslots"):
        problems.append(f"keyslot(s) {image['unnamed_keyslots']} left that no token names")
    if check.done and check.have is None:
        problems.append("the file list did not arrive whole")
    if marks.get("outer") and check.marks.get("outer") != marks["outer"]:
        problems.append("outer marker lost (the state file system was remade)")
    inner = marks.get("inner")
    reset_done = cut.kind == FACTORY_RESET and check.marks.get("inner") == "absent"
    if inner and check.done and check.marks.get("inner") != inner and not reset_done:
        problems.append("inner marker lost (encrypted.img was remade)")
    if lost and not (reset_done and check.have == {}):
        problems.append(f"{len(lost)} fsync'd file(s) lost or changed")
    if check.done and not fsck_clean(check):
        problems.append("fsck not clean: " + _fsck_summary(check))
    outcome = "; ".join(problems) if problems else _good_outcome(cut, check, reset_done)
    return {
        "kind": cut.kind,
        "case": cut.case,
        "ok": not problems,
        "outcome": outcome,
        "fsynced_files": len(expected),
        "lost_files": 0 if reset_done and check.have == {} else len(lost),
        "lost": lost[:10],
        "fsck_clean": fsck_clean(check),
        "reformatted": any("marker lost" in p for p in problems),
        "came_up": came_up and check.done,
        "reset_done": reset_done,
    }


def _good_outcome(cut: Cut, check: Check, reset_done: bool) -> str:
    if cut.kind == FACTORY_RESET:
        return "came up; reset " + (
            "complete: a new image" if reset_done else "not done: old image"
        )
    return "came up; image complete, files intact, fsck clean"


def _fsck_summary(check: Check) -> str:
    if check.fsck is None:
        return "no fsck result"
    return ", ".join(
        f"{fs} status {check.fsck.get(fs, {}).get('status')}" for fs in ("inner", "outer")
    )


def last_pystate_line(console: str) -> str:
    """The initrd's last ``pystate:`` line (a stop's reason), for a row's detail."""
    found = [_clean(line) for line in console.splitlines() if "pystate:" in line]
    return found[-1][:300] if found else ""
