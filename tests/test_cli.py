"""The pystate command as a person meets it: output, exit status, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from pystate_initrd import __version__

STATE_TYPE = "24436126-bb50-47e3-b47b-21dbd57591c7"


def pystate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pystate_initrd", *args],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pystate: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(path)], check=True)
    script = (
        "label: gpt\n"
        "size=16M, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root\n"
        f"size=32M, type={STATE_TYPE}, name=state\n"
    )
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    return path


def test_version() -> None:
    # Run from the checkout, which holds testhooks/: a test build says so (test_build.py
    # checks that the production zipapp prints the bare version).
    proc = pystate("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"pystate {__version__} (test build: test hooks included)"


def test_gpt_table_marks_the_state_partition(disk: Path) -> None:
    proc = pystate("gpt", str(disk))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "512-byte sectors" in lines[0]
    state_lines = [line for line in lines if "pystate state partition" in line]
    assert len(state_lines) == 1 and "'state'" in state_lines[0]


def test_gpt_json_matches_sfdisk(disk: Path) -> None:
    ours = json.loads(pystate("gpt", str(disk), "--json").stdout)
    theirs = json.loads(
        subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, check=True).stdout
    )["partitiontable"]
    assert ours["disk_guid"] == theirs["id"].lower()
    for mine, ref in zip(ours["partitions"], theirs["partitions"], strict=True):
        assert mine["type_guid"] == ref["type"].lower()
        assert mine["part_guid"] == ref["uuid"].lower()
        assert mine["first_lba"] == ref["start"]
        assert mine["name"] == ref["name"]


def test_gpt_garbage_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\xff" * 70000)
    assert_one_line_error(pystate("gpt", str(junk)), str(junk))


def test_gpt_missing_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(pystate("gpt", str(tmp_path / "absent")), "absent")


def test_plan_table_json_and_exit_status(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "home").mkdir(parents=True)
    (state / "var-lib-flatpak").mkdir()
    proc = pystate("plan", "--state", str(state), "--sysroot", "/sysroot")
    assert proc.returncode == 1  # var-lib-flatpak is plain and off the default allowlist
    assert "/sysroot/home" in proc.stdout
    assert "rejected plain entry 'var-lib-flatpak'" in proc.stdout

    conf = tmp_path / "pystate.conf"
    conf.write_text("[state]\nplain-allowlist = /home /var/lib/flatpak\n")
    proc = pystate("plan", "--state", str(state), "--sysroot", "/", "--config", str(conf), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [m["target"] for m in plan["mounts"]] == ["/home", "/var/lib/flatpak"]
    assert plan["rejected"] == []


def test_plan_bad_config_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "pystate.conf"
    conf.write_text("[tpm2]\npcrs = 7+99\n")
    state = tmp_path / "state"
    state.mkdir()
    proc = pystate("plan", "--state", str(state), "--sysroot", "/", "--config", str(conf))
    assert_one_line_error(proc, "pystate.conf", "99")


def test_plan_missing_state_dir_is_one_line(tmp_path: Path) -> None:
    proc = pystate("plan", "--state", str(tmp_path / "nowhere"), "--sysroot", "/")
    assert_one_line_error(proc, "nowhere")
