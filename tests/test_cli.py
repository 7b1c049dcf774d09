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


# --- pystate factory-reset: on a directory standing in for efivarfs (this host has none) -------

RESET_ENTRY = "pystate-factory-reset.efi"
REQUEST_VAR = "PystateFactoryReset-8d901e04-0f5c-45b8-9bac-ca374402d770"
ONESHOT_VAR = "LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
ENTRIES_VAR = "LoaderEntries-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def utf16z(*texts: str) -> bytes:
    return b"".join(t.encode("utf-16-le") + b"\0\0" for t in texts)


def efivars_dir(tmp_path: Path, entries: list[str] | None) -> Path:
    """What systemd-boot leaves: LoaderEntries (attributes 0x6, as it writes them)."""
    efi = tmp_path / "efivars"
    efi.mkdir()
    if entries is not None:
        (efi / ENTRIES_VAR).write_bytes(b"\x06\0\0\0" + utf16z(*entries))
    return efi


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_factory_reset_without_yes_changes_nothing(tmp_path: Path) -> None:
    efi = efivars_dir(tmp_path, ["debian.conf", RESET_ENTRY])
    before = snapshot(efi)
    proc = pystate("factory-reset", "--efivars", str(efi))
    assert proc.returncode == 2, proc
    assert proc.stdout.startswith("Nothing was changed. With --yes, pystate factory-reset sets:")
    assert f"  {REQUEST_VAR} = {RESET_ENTRY!r}  (the request)" in proc.stdout
    assert f"  {ONESHOT_VAR} = {RESET_ENTRY!r}  (boot that entry once)" in proc.stdout
    assert f"At the next boot the boot loader starts entry {RESET_ENTRY!r} once" in proc.stdout
    assert "crypto-erases /state/encrypted.img" in proc.stdout
    assert proc.stderr == ""
    assert snapshot(efi) == before


def test_factory_reset_yes_then_status_then_cancel(tmp_path: Path) -> None:
    efi = efivars_dir(tmp_path, ["debian.conf", RESET_ENTRY])
    proc = pystate("factory-reset", "--yes", "--efivars", str(efi))
    assert proc.returncode == 0, proc
    assert proc.stdout.startswith("Factory reset requested:")
    assert "Reboot to reset; `pystate factory-reset --cancel` withdraws the request." in proc.stdout
    # Exactly what bootctl set-oneshot writes: attributes 0x7, UTF-16LE, NUL-terminated.
    assert (efi / REQUEST_VAR).read_bytes() == b"\x07\0\0\0" + utf16z(RESET_ENTRY)
    assert (efi / ONESHOT_VAR).read_bytes() == b"\x07\0\0\0" + utf16z(RESET_ENTRY)

    boot_json = tmp_path / "boot.json"
    boot_json.write_text(json.dumps({"outcome": "ok", "error": None, "total_ms": 1, "steps": []}))
    proc = pystate("status", "--boot-json", str(boot_json), "--root", str(tmp_path), "--efivars",
                   str(efi))  # fmt: skip
    assert proc.returncode == 0, proc
    assert (
        f"factory reset: REQUESTED for boot entry {RESET_ENTRY!r} (the boot loader starts it "
        "once): that boot crypto-erases encrypted.img" in proc.stdout
    )
    info = json.loads(
        pystate("status", "--json", "--boot-json", str(boot_json), "--efivars", str(efi)).stdout
    )
    assert info["factory_reset"]["request"] == RESET_ENTRY

    proc = pystate("factory-reset", "--cancel", "--efivars", str(efi))
    assert proc.returncode == 0, proc
    assert f"withdrew the factory-reset request for boot entry {RESET_ENTRY!r}" in proc.stdout
    assert f"removed the one-shot boot entry {RESET_ENTRY!r}" in proc.stdout
    assert sorted(snapshot(efi)) == [ENTRIES_VAR]
    proc = pystate("factory-reset", "--cancel", "--efivars", str(efi))
    assert proc.returncode == 0
    assert proc.stdout.strip() == "no factory reset was requested; nothing was changed"


def test_factory_reset_refuses_an_entry_the_boot_loader_does_not_list(tmp_path: Path) -> None:
    efi = efivars_dir(tmp_path, ["debian.conf", "auto-efi-shell"])
    proc = pystate("factory-reset", "--yes", "--efivars", str(efi))
    assert_one_line_error(
        proc,
        f"boot entry {RESET_ENTRY!r} is not one of the boot loader's entries (LoaderEntries: "
        "'debian.conf', 'auto-efi-shell'); nothing was changed",
        f"/EFI/Linux/{RESET_ENTRY}",
    )
    assert sorted(snapshot(efi)) == [ENTRIES_VAR]
    proc = pystate("factory-reset", "--efivars", str(efi))  # the dry run refuses alike
    assert_one_line_error(proc, "is not one of the boot loader's entries")


def test_factory_reset_other_entry_and_spelling(tmp_path: Path) -> None:
    efi = efivars_dir(tmp_path, ["debian.conf", "reset.conf"])
    proc = pystate("factory-reset", "--yes", "--entry", "Reset.CONF", "--efivars", str(efi))
    assert proc.returncode == 0, proc
    # Written as systemd-boot spells it (it lowercases its ids).
    assert (efi / REQUEST_VAR).read_bytes() == b"\x07\0\0\0" + utf16z("reset.conf")
    assert (efi / ONESHOT_VAR).read_bytes() == b"\x07\0\0\0" + utf16z("reset.conf")


def test_factory_reset_without_loader_entries_is_not_checked(tmp_path: Path) -> None:
    efi = efivars_dir(tmp_path, None)
    proc = pystate("factory-reset", "--yes", "--efivars", str(efi))
    assert proc.returncode == 0, proc
    assert proc.stdout.startswith("note: the boot loader does not list its entries")
    assert sorted(snapshot(efi)) == [ONESHOT_VAR, REQUEST_VAR]


def test_factory_reset_cancel_leaves_another_one_shot_entry(tmp_path: Path) -> None:
    efi = efivars_dir(tmp_path, ["debian.conf", RESET_ENTRY])
    (efi / ONESHOT_VAR).write_bytes(b"\x07\0\0\0" + utf16z("debian.conf"))
    proc = pystate("factory-reset", "--cancel", "--efivars", str(efi))
    assert proc.returncode == 0
    assert "the one-shot boot entry is 'debian.conf', not the reset entry: left alone" in (
        proc.stdout
    )
    assert sorted(snapshot(efi)) == [ENTRIES_VAR, ONESHOT_VAR]


def test_factory_reset_without_efi_variables(tmp_path: Path) -> None:
    for args in ((), ("--yes",), ("--cancel",)):
        proc = pystate("factory-reset", *args, "--efivars", str(tmp_path / "absent"))
        assert_one_line_error(
            proc,
            f"no EFI variables at {tmp_path / 'absent'}: this machine did not boot through UEFI",
        )
    assert not (tmp_path / "absent").exists()


def test_factory_reset_bad_entry_and_exclusive_options(tmp_path: Path) -> None:
    efi = efivars_dir(tmp_path, None)
    assert_one_line_error(
        pystate("factory-reset", "--entry", "", "--efivars", str(efi)), "is not a boot entry id"
    )
    proc = pystate("factory-reset", "--yes", "--cancel", "--efivars", str(efi))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    assert list(efi.iterdir()) == []
