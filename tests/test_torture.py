"""build.py torture (issue 14, power cuts): the pure parts on the host, and a short seeded
slice in QEMU (marked ``qemu``) so the machinery keeps working: two cuts of different kinds
(an online grow under the writer, and provisioning), each judged by the machine's next boot.

The full campaign (docs/reliability.md) is ``build.py torture --seed 1 --cuts 40``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import needs_root

from pystate_build import qemu_harness as harness
from pystate_build import torture, torture_plan
from pystate_build.torture_plan import Check, Cut, Window

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


# --- the schedule -------------------------------------------------------------------------


def test_the_schedule_is_a_function_of_the_seed() -> None:
    assert torture_plan.schedule(1, 40) == torture_plan.schedule(1, 40)
    assert torture_plan.schedule(1, 40) != torture_plan.schedule(2, 40)


def test_the_cuts_are_spread_evenly_over_the_kinds() -> None:
    cuts = torture_plan.schedule(7, 40)
    assert [c.index for c in cuts] == list(range(1, 41))
    counts = {k: sum(c.kind == k for c in cuts) for k in torture_plan.KINDS}
    assert sum(counts.values()) == 40
    assert set(counts.values()) <= {6, 7}, counts
    for cut in cuts:
        assert 0 <= cut.fraction < 1
        assert (cut.step in torture_plan.PROVISION_STEPS) == (cut.kind == torture_plan.PROVISION)


def test_only_the_kinds_asked_for() -> None:
    cuts = torture_plan.schedule(3, 5, [torture_plan.GROW, torture_plan.RESEAL])
    assert {c.kind for c in cuts} == {torture_plan.GROW, torture_plan.RESEAL}
    assert torture_plan.schedule(3, 5, []) == []


def test_a_window_turns_a_fraction_into_a_delay() -> None:
    assert Window("x", 2.0).delay(0.25) == 0.5
    assert Cut(3, torture_plan.PROVISION, "mkfs", 0.42).case == "#3 mkfs at 42%"


# --- windows from an uncut boot's console ---------------------------------------------------

LINES = (
    (10.0, "[   9.100000] pystate: mount-state done in 80.0 ms: /dev/vda2"),
    (12.5, "[  11.600000] pystate: seal done in 2400.1 ms: to sha256:7,15"),
    (13.0, "[  12.100000] pystate: allocate done in 20.0 ms"),
    (16.0, "[  15.100000] pystate: luks-format done in 3000.0 ms"),
    (29.0, "TT-GO grow"),
    (30.0, "TT-RESIZE grow 802 MiB -> 866 MiB: by hand: 866 MiB"),
    (32.0, "TT-RESIZE grow 802 MiB -> 866 MiB in 0.46 s (allocate 189 ms, …)"),
    (32.5, 'TT-RESIZED {"status": 0}'),
)


def test_the_window_of_an_initrd_step_starts_at_the_line_before_it() -> None:
    seal = torture_plan.initrd_window(LINES, "seal", "seal")
    assert seal == Window(r"pystate: mount\-state done in", 2.5)
    span = torture_plan.initrd_window(LINES, "allocate", "luks-format")
    assert span is not None and span.span == 3.5
    assert torture_plan.initrd_window(LINES, "mkfs", "mkfs") is None  # never ran
    assert torture_plan.initrd_window(LINES, "mount-state", "seal") is None  # no line before


def test_the_window_of_a_booted_resize_is_its_decision_to_its_end() -> None:
    window = torture_plan.guest_window(LINES, "grow")
    assert window is not None and window.span == 0.46  # the steps, as pystate timed them
    import re

    assert re.search(window.anchor, "TT-RESIZE grow 802 MiB -> 866 MiB: by hand: 866 MiB")
    assert re.search(window.anchor, "[  30.1] TT-RESIZE grow 1 GiB -> 2 GiB: by hand")
    assert not re.search(window.anchor, "TT-RESIZE none: nothing to do")
    assert torture_plan.guest_window(LINES[:5], "grow") is None


def test_the_btrfs_shrink_window_leaves_out_the_grow_before_it() -> None:
    lines = (
        (1.0, "TT-RESIZE grow 802 MiB -> 866 MiB: by hand: 866 MiB"),
        (2.0, 'TT-RESIZED {"status": 0}'),
        (5.0, "TT-RESIZE shrink 866 MiB -> 802 MiB: by hand: 802 MiB"),
        (5.75, 'TT-RESIZED {"status": 0}'),
    )
    window = torture_plan.guest_window(lines, "shrink")
    assert window is not None and window.span == 0.75  # no change line: to TT-RESIZED
    import re

    assert not re.search(window.anchor, lines[0][1])


def test_a_cut_landed_when_the_window_had_not_ended() -> None:
    grow = Cut(1, torture_plan.GROW, "", 0.5)
    decided = "TT-RESIZE grow 1 GiB -> 2 GiB: by hand"
    assert torture_plan.landed(grow, decided)
    assert not torture_plan.landed(grow, decided + "\nTT-RESIZED {}")
    assert not torture_plan.landed(grow, "TT-CHECKED")  # never got there
    shrink = Cut(2, torture_plan.BTRFS_SHRINK, "", 0.5)
    grown = "TT-RESIZE grow 1 GiB -> 2 GiB: by hand\nTT-RESIZED {}\n"
    assert torture_plan.landed(shrink, grown + "TT-RESIZE shrink 2 GiB -> 1 GiB: by hand")
    assert not torture_plan.landed(shrink, grown)
    mkfs = Cut(3, torture_plan.PROVISION, "mkfs", 0.5)
    assert torture_plan.landed(mkfs, "pystate: luks-format done in 3.0 ms")
    assert not torture_plan.landed(mkfs, "pystate: mkfs done in 3.0 ms")
    reset = Cut(4, torture_plan.FACTORY_RESET, "", 0.5)
    assert not torture_plan.landed(reset, "[ 1.0] pystate: reset-end done in 2.0 ms: marker")


# --- the fsync log and the check ------------------------------------------------------------


def test_the_fsync_log_keeps_whole_lines_and_survives_interleaving() -> None:
    console = "\n".join(
        [
            f"TT-FSYNC b2-00000 {SHA_A}",
            f"[  40.1] random kernel line TT-FSYNC b2-00001 {SHA_B}",  # mid-line is fine
            f"TT-FSYNC b2-00002 {SHA_A[:40]}",  # cut short by the power: not logged
            "TT-FSYNC b2-00003",
        ]
    )
    assert torture_plan.fsync_log(console) == {"b2-00000": SHA_A, "b2-00001": SHA_B}


def check_console(have: dict[str, str], *, end: int | None = None, inner: str = SHA_B) -> str:
    lines = ["TT-MARK outer " + SHA_A, "TT-MARK inner " + inner]
    lines += [f"TT-HAVE {n} {h}" for n, h in have.items()]
    lines.append(f"TT-HAVE-END {len(have) if end is None else end}")
    lines.append("TT-RECOVERY " + "-".join(["cbdefghi"] * 8))
    return "\n".join(lines)


RT_OK: dict[str, dict[str, object]] = {
    "TT-IMAGE": {"img": True, "new": False, "mapped": True, "mounted": True},
    "TT-FSCK": {"inner": {"status": 0}, "outer": {"status": 0}},
    "TT-CHECKED": {"files": 1},
}


def test_the_check_is_parsed_and_a_short_file_list_is_not_taken() -> None:
    check = torture_plan.parse_check(check_console({"f": SHA_A}), RT_OK)
    assert check.have == {"f": SHA_A} and check.done
    assert check.marks == {"outer": SHA_A, "inner": SHA_B}
    assert check.recovery_key.startswith("cbdefghi-")
    assert torture_plan.fsck_clean(check)
    short = torture_plan.parse_check(check_console({"f": SHA_A}, end=2), RT_OK)
    assert short.have is None  # a line was lost: nothing is concluded from the list


# --- the verdict --------------------------------------------------------------------------

MARKS = {"outer": SHA_A, "inner": SHA_B}
GROW_CUT = Cut(1, torture_plan.GROW, "", 0.5)


def judge(cut: Cut, check: Check, expected: dict[str, str], **kw: object) -> dict[str, object]:
    args: dict[str, object] = {"came_up": True, "stop": "", "marks": MARKS, **kw}
    return torture_plan.verdict(cut, check=check, expected=expected, **args)  # type: ignore[arg-type]


def test_a_good_cut() -> None:
    check = torture_plan.parse_check(check_console({"f": SHA_A, "g": SHA_B}), RT_OK)
    row = judge(GROW_CUT, check, {"f": SHA_A})  # g: written, never logged: fine
    assert row["ok"] and row["lost_files"] == 0 and row["fsck_clean"], row
    assert not row["reformatted"]


def test_a_lost_or_changed_fsynced_file_fails() -> None:
    check = torture_plan.parse_check(check_console({"f": SHA_B}), RT_OK)
    row = judge(GROW_CUT, check, {"f": SHA_A, "g": SHA_A})
    assert not row["ok"] and row["lost_files"] == 2 and row["lost"] == ["f", "g"]


def test_a_boot_that_does_not_come_up_fails_with_its_reason() -> None:
    row = judge(GROW_CUT, Check(), {}, came_up=False, stop="pystate: e2fsck exited 4")
    assert not row["ok"] and "e2fsck exited 4" in str(row["outcome"])


def test_fsck_errors_and_a_leftover_new_image_fail() -> None:
    rt = {**RT_OK, "TT-FSCK": {"inner": {"status": 4}, "outer": {"status": 0}}}
    row = judge(GROW_CUT, torture_plan.parse_check(check_console({}), rt), {})
    assert not row["ok"] and "inner status 4" in str(row["outcome"])
    rt = {**RT_OK, "TT-IMAGE": {"img": True, "new": True, "mounted": True}}
    row = judge(GROW_CUT, torture_plan.parse_check(check_console({}), rt), {})
    assert not row["ok"] and "encrypted.img.new" in str(row["outcome"])


def test_a_keyslot_no_token_names_fails() -> None:
    # What a cut re-seal leaked before its journal: a keyslot whose secret nobody has.
    reseal = Cut(4, torture_plan.RESEAL, "", 0.6)
    image = {**RT_OK["TT-IMAGE"], "unnamed_keyslots": [2]}
    row = judge(
        reseal, torture_plan.parse_check(check_console({}), {**RT_OK, "TT-IMAGE": image}), {}
    )
    assert not row["ok"] and "keyslot(s) [2] left that no token names" in str(row["outcome"])
    image = {**RT_OK["TT-IMAGE"], "unnamed_keyslots": []}
    assert judge(
        reseal, torture_plan.parse_check(check_console({}), {**RT_OK, "TT-IMAGE": image}), {}
    )["ok"]


def test_a_remade_image_or_state_is_a_reformat() -> None:
    check = torture_plan.parse_check(check_console({}, inner="absent"), RT_OK)
    row = judge(GROW_CUT, check, {})
    assert not row["ok"] and row["reformatted"]


def test_a_factory_reset_may_lose_everything_but_only_everything() -> None:
    reset = Cut(2, torture_plan.FACTORY_RESET, "", 0.3)
    done = torture_plan.parse_check(check_console({}, inner="absent"), RT_OK)
    row = judge(reset, done, {"f": SHA_A})
    assert row["ok"] and row["reset_done"] and row["lost_files"] == 0, row
    half = torture_plan.parse_check(check_console({"g": SHA_A}, inner="absent"), RT_OK)
    assert not judge(reset, half, {"f": SHA_A})["ok"]
    kept = torture_plan.parse_check(check_console({"f": SHA_A}), RT_OK)
    row = judge(reset, kept, {"f": SHA_A})
    assert row["ok"] and not row["reset_done"]


def test_a_provisioning_cut_has_no_inner_marker_to_keep() -> None:
    check = torture_plan.parse_check(check_console({}, inner="absent"), RT_OK)
    cut = Cut(3, torture_plan.PROVISION, "mkfs", 0.1)
    assert judge(cut, check, {}, marks={"outer": SHA_A})["ok"]


def test_the_summary_counts_only_cuts_made() -> None:
    rows: list[dict[str, object]] = [
        {"kind": "cut-grow", "ok": True, "cut": True, "came_up": True, "fsynced_files": 5,
         "lost_files": 0, "fsck_clean": True, "reformatted": False},
        {"kind": "cut-grow", "ok": True, "cut": False, "fsynced_files": 3},
        {"kind": "disk-eio", "ok": False},
    ]  # fmt: skip
    assert torture.summary(rows) == {
        "cuts_made": 1, "in_window": 0, "came_up": 1, "fsynced_files": 5, "lost_files": 0,
        "fsck_clean": 1, "reformats": 0, "failed_rows": 1,
    }  # fmt: skip
    assert "cut-grow" in torture.table([{**rows[0], "case": "#1", "outcome": "x"}])


def test_unknown_kinds_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rows, status = torture.campaign(1, 0, {"disk-eio"}, tmp_path, None, echo=False)
    assert rows == [] and status == 2
    assert "unknown kind(s): disk-eio" in capsys.readouterr().err


# --- the harness's cut --------------------------------------------------------------------


def test_qemu_argv_takes_the_cache_mode() -> None:
    argv = harness.qemu_argv([Path("d.img")], Path("k"), None, "", 512, None, cache="writeback")
    assert any("cache=writeback," in a for a in argv)
    assert any(
        "cache=unsafe," in a for a in harness.qemu_argv([Path("d")], Path("k"), None, "", 1, None)
    )
    with pytest.raises(harness.HarnessError):
        harness.qemu_argv([Path("d")], Path("k"), None, "", 1, None, cache="bogus")


# --- the QEMU slice -----------------------------------------------------------------------


@pytest.mark.qemu
@needs_root
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU")
def test_a_seeded_slice_of_power_cuts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two cuts (seed 14): an online grow under the writer and a provisioning step; each
    judged by the next boot (came up, files intact, fsck clean, markers kept)."""
    work = tmp_path_factory.mktemp("torture")
    only = {torture_plan.GROW, torture_plan.PROVISION}
    rows, status = torture.campaign(14, 2, only, work, work / "torture.json")
    assert {r["kind"] for r in rows} == only, rows
    for row in rows:
        assert row["cut"], row  # the power really went, inside the window
        assert row["ok"], row
    assert status == 0
    grow = next(r for r in rows if r["kind"] == torture_plan.GROW)
    assert int(str(grow["fsynced_files"])) > 0, grow  # the writer ran before the cut
