"""The boot report: named steps with durations, written as /run/pystate/boot.json.

Each step is timed with a monotonic clock and logged as one line with its
duration, so a slow boot can be read straight from the kernel log.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pystate_initrd import __version__
from pystate_initrd.log import Log

REPORT_VERSION = 1

# External commands this process has started (system/run.py counts each): the unlock path
# is judged by how many processes it costs as well as by time (SPEC §10).
_started = [0]  # a list: incremented in place, no global statement


def process_started() -> None:
    _started[0] += 1


def processes_started() -> int:
    return _started[0]


def peak_kib() -> dict[str, int]:
    """Peak resident memory so far (KiB): this process's (VmHWM) and its largest child's."""
    import resource

    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }


@dataclass
class Step:
    name: str
    ms: float
    ok: bool
    detail: str = ""
    processes: int = 0  # external commands the step started


@dataclass
class BootReport:
    log: Log
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)
    outcome: str = "running"
    error: str | None = None

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time the body; the body may set ``.detail`` on the yielded step."""
        record = Step(name, 0.0, False)
        begin, spawned = time.monotonic(), processes_started()
        try:
            yield record
        except BaseException:
            record.ms = round((time.monotonic() - begin) * 1000, 1)
            record.processes = processes_started() - spawned
            self.steps.append(record)
            self.log.error(f"step {name} failed after {record.ms:.1f} ms")
            raise
        record.ms = round((time.monotonic() - begin) * 1000, 1)
        record.processes = processes_started() - spawned
        record.ok = True
        self.steps.append(record)
        suffix = f": {record.detail}" if record.detail else ""
        self.log.info(f"{name} done in {record.ms:.1f} ms{suffix}")

    def total_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 1)

    def to_json(self) -> dict[str, object]:
        return {
            "report_version": REPORT_VERSION,
            "pystate_version": __version__,
            "outcome": self.outcome,
            "error": self.error,
            "total_ms": self.total_ms(),
            "processes": processes_started(),
            "peak_kib": peak_kib(),
            "steps": [
                {
                    "name": s.name,
                    "ms": s.ms,
                    "ok": s.ok,
                    "detail": s.detail,
                    "processes": s.processes,
                }
                for s in self.steps
            ],
            **self.facts,
        }

    def write(self, path: Path) -> None:
        """Write atomically (temp file + rename) so readers never see half a report."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
