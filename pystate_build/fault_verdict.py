"""The fault torture's verdicts: what a boot's console and the state before and after say (pure).

A fault must end in a recovered boot, the recovery prompt or a clear stop, and never in a
Python traceback, a reformat, a new volume key or lost data. ``outcome`` names what the
console shows; ``verdict`` adds the checks of the state and says whether the row is ok.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TRACEBACK = "Traceback (most recent call last)"
PROMPT = "(try 1 of 3)"
DONE = "RT-DONE"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REASON = re.compile(r"error|fail|refus|cannot|stop|no |damaged|lockout|busy|recovery", re.I)
IO_ERROR = re.compile(r"I/O error, dev vd\w+, sector \d+")

RECOVERED = "recovered"  # the boot went on to the guest (after a prompt: prompt+recovered)
PROMPT_OUTCOME = "prompt"
STOPPED = "stopped"
TIMEOUT = "timeout"
TRACEBACK_OUTCOME = "traceback"


@dataclass(frozen=True)
class Seen:
    """One faulted boot, as the host saw it."""

    console: str
    timed_out: bool = False
    before: Mapping[str, object] = field(default_factory=dict)  # fault_host.Identity fields
    after: Mapping[str, object] = field(default_factory=dict)
    problems: Sequence[str] = ()  # what the guest's own checks found (lost data, I/O errors)
    fresh: bool = False  # a provisioning boot: no image before


def _strip(line: str) -> str:
    return re.sub(r"^\[\s*\d+\.\d+\]\s*", "", line).strip()


def pystate_line(console: str) -> str:
    """pystate's one-line reason: its last "boot stopped" line, else its last line that
    looks like an error (its kmsg lines start ``pystate:``)."""
    lines = []
    for raw in console.splitlines():
        line = ANSI.sub("", _strip(raw))
        line = re.sub(r"^pystate\[\d+\]: ", "", line)
        if line.startswith("pystate:"):
            lines.append(line)
    stops = [line for line in lines if "boot stopped" in line]
    errors = [line for line in lines if REASON.search(line)]
    return (stops or errors or lines or [""])[-1][:240]


def failed_steps(console: str) -> list[str]:
    """The boot.json steps that failed or fell back (``failed: …`` details), as one line each;
    boot.json is printed by the guest's init as ``PYSTATE-BOOT-JSON {…}``."""
    import json

    found = []
    for line in console.splitlines():
        _, marker, text = line.partition("PYSTATE-BOOT-JSON ")
        if not marker:
            continue
        try:
            report = json.loads(text)
        except ValueError:
            continue
        for step in report.get("steps", []):
            detail = str(step.get("detail", ""))
            if not step.get("ok", True) or detail.startswith("failed"):
                found.append(f"{step.get('name')}: {detail}"[:200])
    return found


def outcome(console: str, timed_out: bool = False) -> str:
    if TRACEBACK in console:
        return TRACEBACK_OUTCOME
    prompt = PROMPT in console
    if DONE in console:
        return f"{PROMPT_OUTCOME}+{RECOVERED}" if prompt else RECOVERED
    if timed_out:
        return TIMEOUT
    return PROMPT_OUTCOME if prompt else STOPPED


def injected(console: str) -> int:
    """How many failed requests the guest kernel reported (its messages are rate-limited)."""
    return len(IO_ERROR.findall(console))


def state_problems(seen: Seen) -> list[str]:
    """Reformat, a new volume key, a lost marker: compared with the state before."""
    before, after = seen.before, seen.after
    found = []
    if seen.fresh:
        if after.get("luks_uuid") is None and "encrypted.img" in after.get("names", ()):  # type: ignore[operator]
            found.append("an encrypted.img that is no LUKS2 image was left")
    elif after.get("luks_uuid") != before.get("luks_uuid"):
        found.append(f"LUKS UUID {before.get('luks_uuid')} -> {after.get('luks_uuid')}")
    elif after.get("key_digests") != before.get("key_digests"):
        found.append("the volume key's digest changed")
    if after.get("home_marker") != before.get("home_marker"):
        found.append("the plain marker in /home changed")
    return found


def verdict(seen: Seen, allowed: Sequence[str]) -> tuple[str, bool, str]:
    """(outcome, ok, detail): ok when the outcome is one of ``allowed`` and nothing was lost."""
    result = outcome(seen.console, seen.timed_out)
    problems = [*state_problems(seen), *seen.problems]
    if result not in allowed:
        problems.insert(0, f"{result} is not one of {', '.join(allowed)}")
    reason = failed_steps(seen.console) or [pystate_line(seen.console)]
    detail = "; ".join([*problems, *reason])
    return result, not problems, detail
