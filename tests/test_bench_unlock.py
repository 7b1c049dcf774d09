"""build.py bench-unlock's pieces that run on the host: the systemd way's crypttab and fstab
read by systemd's own generators, and the console lines the figures come from."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pystate_build import bench_systemd as bs
from pystate_build import bench_unlock as bu

GENERATORS = Path("/lib/systemd/system-generators")
needs_generators = pytest.mark.skipif(
    not (GENERATORS / "systemd-fstab-generator").exists(), reason="systemd generators missing"
)


def generate(tmp_path: Path, generator: str, variable: str, text: str) -> Path:
    """Run systemd's generator as it runs in an initrd, on text as its input file."""
    source = tmp_path / "input"
    source.write_text(text)
    out = tmp_path / "units"
    out.mkdir()
    env = {**os.environ, variable: str(source), "SYSTEMD_IN_INITRD": "1"}
    subprocess.run([str(GENERATORS / generator), out, out, out], env=env, check=True)
    return out


@needs_generators
def test_the_state_partition_and_every_bind_are_required_by_initrd_fs(tmp_path: Path) -> None:
    out = generate(tmp_path, "systemd-fstab-generator", "SYSTEMD_FSTAB", bs.fstab())
    required = sorted(p.name for p in (out / "initrd-fs.target.requires").iterdir())
    assert required == [
        "run-stateb.mount", "state.mount", "sysroot-etc.mount", "sysroot-home.mount",
        "sysroot-var.mount",
    ]  # fmt: skip
    etc = (out / "sysroot-etc.mount").read_text()
    assert "RequiresMountsFor=/run/stateb" in etc and "What=/run/stateb/etc" in etc
    # the inner and outer file systems are checked first, as pystate checks both
    assert "systemd-fsck@" in (out / "state.mount").read_text()
    assert "systemd-fsck@" in (out / "run-stateb.mount").read_text()


@needs_generators
@pytest.mark.parametrize("provision", [False, True])
def test_the_systemd_way_attaches_the_image_file_after_its_mount(
    tmp_path: Path, provision: bool
) -> None:
    out = generate(
        tmp_path, "systemd-cryptsetup-generator", "SYSTEMD_CRYPTTAB",
        bs.crypttab(provision=provision),
    )  # fmt: skip
    unit = (out / bs.B_UNIT).read_text()
    assert "RequiresMountsFor=/state/encrypted.img" in unit
    assert "tpm2-device=auto" in unit
    # B0's provisioning runs after sysroot.mount and before this unit: without nofail the
    # unit is ordered before cryptsetup.target, which comes before sysroot.mount (a cycle)
    assert ("Before=cryptsetup.target" in unit) is not provision


@needs_generators
def test_clevis_gets_a_passphrase_question(tmp_path: Path) -> None:
    out = generate(
        tmp_path, "systemd-cryptsetup-generator", "SYSTEMD_CRYPTTAB", bs.crypttab(bs.C_NAME)
    )
    unit = (out / bs.C_UNIT).read_text()
    assert "tpm2-device" not in unit and "headless" not in unit


CONSOLE = """\
[   12.0] some kernel line
PYSTATE-RUN-OUT BENCH-UNIT pystate.service ExecMainStartTimestampMonotonic=10077061 \
ExecMainExitTimestampMonotonic=16866763 InactiveExitTimestampMonotonic=10000000 \
ActiveEnterTimestampMonotonic=16900000
PYSTATE-RUN-OUT BENCH-UNIT initrd-switch-root.target InactiveExitTimestampMonotonic=18683139 \
ActiveEnterTimestampMonotonic=18683139
PYSTATE-RUN-OUT BENCH-PEAK pystate 15769600 39
PYSTATE-RUN-OUT BENCH-PEAK broken x 1
"""


def test_unit_times_and_peaks_are_read_from_the_console() -> None:
    units, peaks = bs.parse_bench_lines(CONSOLE)
    assert units["pystate.service"] == bs.UnitTimes(10077061, 16866763, 10000000, 16900000)
    assert units[bs.SWITCH_ROOT].active_enter == 18683139
    assert units[bs.SWITCH_ROOT].main_start == 0  # a target has no main process
    assert peaks == {"pystate": bs.Peak(15769600, 39)}


def test_a_figures_take_the_unlock_steps_and_the_switch_root() -> None:
    row = bu.Row("a", 1)
    report = {
        "steps": [
            {"name": "discover", "ms": 100.0, "processes": 0},
            {"name": "luks-header", "ms": 1.5, "processes": 0},
            {"name": "unseal", "ms": 700.0, "processes": 2},
            {"name": "loop-attach", "ms": 20.0, "processes": 0},
            {"name": "luks-open", "ms": 300.0, "processes": 0},
            {"name": "inner-fsck", "ms": 400.0, "processes": 1},
        ]
    }
    bu._a_figures(row, CONSOLE, report)
    assert row.unlock_ms == [1021.5]
    assert row.initrd_ms == [18683.139]
    assert row.processes == [3]  # pystate and tpm2_load + tpm2_unseal
    assert row.peak_kib == [15769600 / 1024]


def test_ratios_are_medians_of_pairs() -> None:
    a, b = bu.Row("a", 110), bu.Row("b", 100)
    a.unlock_ms, b.unlock_ms = [900.0, 1000.0, 3000.0], [1000.0, 1000.0, 1000.0]
    a.initrd_ms, b.initrd_ms = [20.0, 22.0, 21.0], [20.0, 20.0, 20.0]
    f = bu._figures(a, b, {"crypt": 1000, "crypt+pystate": 1500})
    assert f["ratio_unlock"] == 1.0 and f["ratio_unlock_pairs"] == [0.9, 1.0, 3.0]
    assert f["ratio_initrd_time"] == 1.05
    assert f["ratio_size"] == 1.1 and f["added_to_crypt_initrd_bytes"] == 500
    for row in ("a", "b"):
        assert set(f[row]) >= {"unlock_ms", "initrd_ms", "size_bytes", "peak_kib", "processes"}
