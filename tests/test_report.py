"""The boot report's per-step counts of processes and its peak memory (report.py)."""

from __future__ import annotations

import pytest

from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.system.run import CommandError, run


def test_each_step_counts_the_commands_it_started() -> None:
    report = BootReport(Log(kmsg_path="/nonexistent"))
    with report.step("two"):
        run(["true"])
        run(["sh", "-c", "true"])  # the shell's own child is not pystate's: 1
    with report.step("none"):
        pass
    with pytest.raises(CommandError), report.step("failing"):
        run(["false"])
    data = report.to_json()
    steps = {s["name"]: s for s in data["steps"]}  # type: ignore[union-attr]
    assert (steps["two"]["processes"], steps["none"]["processes"]) == (2, 0)
    assert steps["failing"]["processes"] == 1 and not steps["failing"]["ok"]
    assert data["processes"] >= 3  # type: ignore[operator]


def test_the_report_holds_the_peak_memory_of_pystate_and_its_largest_child() -> None:
    report = BootReport(Log(kmsg_path="/nonexistent"))
    with report.step("big child"):
        # a child that touches 64 MiB: its peak shows, pystate's own stays its own
        run(["python3", "-c", "b = bytearray(64 << 20)"])
    peak = report.to_json()["peak_kib"]
    assert isinstance(peak, dict)
    assert peak["children"] >= 64 * 1024
    assert peak["self"] > 0
