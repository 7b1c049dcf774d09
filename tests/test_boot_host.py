"""The initrd pipeline (`pystate boot`) on the host: real GPT image, loop device, e2fsck, mounts.

No QEMU: a tmpfs stands in for /sysroot and `pystate.state=` names the loop
partition, so every step after discovery runs exactly as in the initrd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, needs_root

pytestmark = needs_root

STATE_TYPE = "24436126-bb50-47e3-b47b-21dbd57591c7"
# The host has no TPM: these boots are first boots without one, which stop by default
# (SPEC §11.1). Every test but those of that stop boots with this in its pystate.conf.
TPM_OPTIONAL = "[tpm2]\nrequired = no\n"


def sh(*argv: str, input: bytes | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, input=input).stdout.decode()


@dataclass
class Machine:
    tmp: Path
    device: str
    sysroot: Path

    def boot(
        self,
        *cmdline: str,
        config: str | None = TPM_OPTIONAL,
        program: Sequence[str] = (),
    ) -> tuple[int, dict, str]:  # type: ignore[type-arg]
        """Run ``pystate boot``: the checkout's package, or ``program`` (a frozen one);
        config is the pystate.conf's text (None: no file, the defaults)."""
        (self.tmp / "cmdline").write_text(" ".join(["quiet", *cmdline]) + "\n")
        conf = self.tmp / "pystate.conf"
        if config is not None:
            conf.write_text(config)
        else:
            conf.unlink(missing_ok=True)
        proc = subprocess.run(
            [*(program or [sys.executable, "-m", "pystate_initrd"]), "boot",
             "--sysroot", str(self.sysroot),
             "--cmdline", str(self.tmp / "cmdline"), "--run-dir", str(self.tmp / "run"),
             "--log", "/dev/stderr", "--config", str(conf)],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        report = json.loads((self.tmp / "run/boot.json").read_text())
        return proc.returncode, report, proc.stderr

    def mounts(self) -> dict[str, str]:
        """target → options of everything mounted below the sysroot."""
        out = {}
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4].startswith(str(self.sysroot) + "/"):
                out[fields[4][len(str(self.sysroot)) :]] = fields[5]
        return out


def make_state_disk(tmp: Path, state: Path, *, attrs: str = "") -> Path:
    fs = tmp / "state.fs"
    subprocess.run(["truncate", "-s", "64M", str(fs)], check=True)
    sh("mkfs.ext4", "-q", "-d", str(state), str(fs))
    disk = tmp / "disk.img"
    subprocess.run(["truncate", "-s", "80M", str(disk)], check=True)
    attr = f", attrs={attrs}" if attrs else ""
    script = f"label: gpt\nstart=2048, size=131072, type={STATE_TYPE}, name=state{attr}\n"
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk), input=script.encode())
    subprocess.run(
        ["dd", f"if={fs}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc", "status=none"],
        check=True,
    )
    return disk


@pytest.fixture
def state_tree(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    (state / "home/alice").mkdir(parents=True)
    (state / "home/alice/notes.txt").write_text("kept\n")
    (state / "etc").mkdir()  # plain /etc: off the default allowlist
    os.symlink("/etc", state / "srv")  # a symlink entry must never be followed
    (state / "usr-local").mkdir()  # forbidden target
    (state / ".pystate").mkdir()  # reserved: silently skipped
    return state


@pytest.fixture
def machine(tmp_path: Path, state_tree: Path, request: pytest.FixtureRequest) -> Iterator[Machine]:
    attrs = getattr(request, "param", "")
    disk = make_state_disk(tmp_path, state_tree, attrs=attrs)
    loop = sh("losetup", "-f", "--show", str(disk)).strip()
    sysroot = tmp_path / "sysroot"
    sysroot.mkdir()
    try:
        # The host kernel may not scan partition tables itself; partx adds the nodes.
        sh("partx", "-a", loop)
        sh("mount", "-t", "tmpfs", "tmpfs", str(sysroot))
        for d in ("home", "state", "etc", "srv"):
            (sysroot / d).mkdir()
        yield Machine(tmp_path, f"{loop}p1", sysroot)
    finally:
        subprocess.run(["umount", "-R", str(sysroot)], check=False, capture_output=True)
        subprocess.run(["partx", "-d", loop], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


def test_binds_home_and_rejects_hostile_entries(machine: Machine) -> None:
    rc, report, log = machine.boot(f"pystate.state={machine.device}")
    assert rc == 0, log
    assert report["outcome"] == "ok"
    assert (machine.sysroot / "home/alice/notes.txt").read_text() == "kept\n"
    mounts = machine.mounts()
    assert set(mounts) == {"/state", "/home"}
    assert "nosuid" in mounts["/home"] and "nodev" in mounts["/home"]
    rejected = {r["name"]: r["reason"] for r in report["rejected"]}
    assert set(rejected) == {"etc", "srv", "usr-local"}
    assert "symbolic link" in rejected["srv"]
    assert "rejected plain entry 'srv'" in log
    assert [s["name"] for s in report["steps"]] == [
        "config", "discover", "probe", "fsck", "mount-state", "plan", "mounts",
    ]  # fmt: skip
    assert all(s["ok"] for s in report["steps"])


def test_dirty_state_fs_is_repaired_then_mounted(machine: Machine) -> None:
    # Mark the file system as not cleanly unmounted with errors: e2fsck -p must run and fix.
    sh("debugfs", "-w", "-R", "ssv state 2", machine.device)
    rc, report, log = machine.boot(f"pystate.state={machine.device}")
    assert rc == 0, log
    fsck = next(s for s in report["steps"] if s["name"] == "fsck")
    assert fsck["detail"] in ("corrected", "clean")
    assert (machine.sysroot / "home/alice/notes.txt").exists()


def _fs_state(device: str) -> str:
    """The 'Filesystem state' line of the superblock, e.g. 'clean' or 'clean with errors'."""
    for line in sh("dumpe2fs", "-h", device).splitlines():
        if line.startswith("Filesystem state:"):
            return line.partition(":")[2].strip()
    raise AssertionError(f"dumpe2fs -h {device} has no state line")


def test_check_fs_no_leaves_the_outer_fs_unchecked(machine: Machine) -> None:
    # [state] check-fs = no: the flagged errors must still be there after the boot, because
    # no fsck ran; with the default, e2fsck -p clears them (the test above).
    sh("debugfs", "-w", "-R", "ssv state 2", machine.device)
    rc, report, log = machine.boot(
        f"pystate.state={machine.device}", config="[state]\ncheck-fs = no\n" + TPM_OPTIONAL
    )
    assert rc == 0, log
    fsck = next(s for s in report["steps"] if s["name"] == "fsck")
    assert fsck["detail"] == "skipped: [state] check-fs = no"
    assert "errors" in _fs_state(machine.device)
    assert (machine.sysroot / "home/alice/notes.txt").exists()


def test_check_fs_default_clears_flagged_errors(machine: Machine) -> None:
    sh("debugfs", "-w", "-R", "ssv state 2", machine.device)
    rc, _, log = machine.boot(f"pystate.state={machine.device}")
    assert rc == 0, log
    assert "errors" not in _fs_state(machine.device)


def _debug_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("<7>pystate:")]


@pytest.mark.parametrize("word", ["pystate.debug=0", "pystate.debug=no", ""])
def test_debug_off_logs_no_debug_line(machine: Machine, word: str) -> None:
    rc, _, log = machine.boot(f"pystate.state={machine.device}", word)
    assert rc == 0, log
    assert _debug_lines(log) == []


@pytest.mark.parametrize("word", ["pystate.debug", "pystate.debug=1", "pystate.debug=yes"])
def test_debug_on_logs_every_command_with_status_and_duration(machine: Machine, word: str) -> None:
    rc, _, log = machine.boot(f"pystate.state={machine.device}", word)
    assert rc == 0, log
    commands = [line for line in _debug_lines(log) if " run: " in line]
    # The outer fsck is the one external command of a plain boot.
    assert len(commands) == 1, log
    assert f"run: e2fsck -p {machine.device} -> exit 0 in " in commands[0]
    assert commands[0].endswith(" ms")


def test_damaged_state_fs_stops_boot_and_mounts_nothing(machine: Machine) -> None:
    # Clear the root directory's inode and flag the errors: e2fsck -p won't fix that unattended.
    sh("debugfs", "-w", "-R", "clri <2>", machine.device)
    sh("debugfs", "-w", "-R", "ssv state 2", machine.device)
    rc, report, log = machine.boot(f"pystate.state={machine.device}")
    assert rc == 1, log
    assert report["outcome"] == "failed", log
    assert "e2fsck -p" in report["error"] and machine.device in report["error"]
    assert machine.mounts() == {}


@pytest.mark.parametrize("machine", ["60"], indirect=True)
def test_read_only_bit_mounts_read_only_without_fsck(machine: Machine) -> None:
    rc, report, log = machine.boot(f"pystate.state={machine.device}")
    assert rc == 0, log
    assert report["partition"]["read_only"] is True
    assert machine.mounts()["/state"].startswith("ro")
    with pytest.raises(OSError):
        (machine.sysroot / "home/alice/new").write_text("x")


def test_missing_target_in_read_only_root_stops_boot(machine: Machine) -> None:
    (machine.sysroot / "home").rmdir()
    sh("mount", "-o", "remount,ro", str(machine.sysroot))
    rc, report, log = machine.boot(f"pystate.state={machine.device}")
    assert rc == 1
    assert "target /home does not exist" in report["error"]
    assert "read-only" in report["error"]
    # The state partition itself stays mounted (read-only root still had /state).
    assert "/home" not in machine.mounts()


def test_disabled_on_the_command_line(machine: Machine) -> None:
    rc, report, _ = machine.boot("pystate=0", f"pystate.state={machine.device}")
    assert rc == 0
    assert report["outcome"] == "disabled"
    assert machine.mounts() == {}


def test_allowlist_from_trusted_config(machine: Machine) -> None:
    config = "[state]\nplain-allowlist = /home /etc\n" + TPM_OPTIONAL
    rc, report, log = machine.boot(f"pystate.state={machine.device}", config=config)
    assert rc == 0, log
    assert set(machine.mounts()) == {"/state", "/home", "/etc"}
    # published for the booted system's resize service, byte for byte (SPEC §9)
    assert (machine.tmp / "run/pystate.conf").read_text() == config


def test_without_a_config_file_the_published_copy_says_defaults(machine: Machine) -> None:
    # The defaults stop this first boot without a TPM (below); the copy is published before.
    rc, _, log = machine.boot(f"pystate.state={machine.device}", config=None)
    assert rc == 1, log
    published = (machine.tmp / "run/pystate.conf").read_text()
    assert published.startswith("# no ") and "built-in defaults" in published


def test_unmountable_state_fs_gives_one_clear_line(machine: Machine) -> None:
    # Damage that the "clean" flag hides from e2fsck -p: the mount itself fails.
    sh("debugfs", "-w", "-R", "clri <2>", machine.device)
    rc, report, log = machine.boot(f"pystate.state={machine.device}")
    assert rc == 1, log
    assert report["outcome"] == "failed"
    assert report["error"].startswith(f"mounting the state partition {machine.device} (ext4)")
    assert "Traceback" not in log
    assert machine.mounts() == {}


def test_overlay_mode_shows_the_image_and_writes_to_the_state(machine: Machine) -> None:
    """`mode = overlay`: the image's own /etc is the lower layer, the state entry the upper."""
    (machine.sysroot / "etc/os-release").write_text("from the image\n")
    config = (
        "[state]\nplain-allowlist = /home /etc\n"
        "[layout /etc]\narea = plain\nmode = overlay\n"
        "[layout /home]\narea = plain\n" + TPM_OPTIONAL
    )
    rc, report, log = machine.boot(f"pystate.state={machine.device}", config=config)
    assert rc == 0, log
    etc = machine.sysroot / "etc"
    assert (etc / "os-release").read_text() == "from the image\n"  # lower layer visible
    (etc / "hostname").write_text("written at run time\n")
    (etc / "os-release").write_text("changed\n")  # copied up, the lower file untouched
    mounts = {
        line.split()[4]: line.split(" - ")[1].split()[0]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(machine.sysroot))
    }
    assert mounts[str(etc)] == "overlay"
    upper = machine.sysroot / "state/etc"
    assert (upper / "hostname").read_text() == "written at run time\n"
    assert (upper / "os-release").read_text() == "changed\n"
    # the overlay's work directory is kept under the area's reserved .pystate, not in the entry
    assert (machine.sysroot / "state/.pystate/overlay-work/etc").is_dir()
    assert [m["mode"] for m in report["mounts"] if m["target"] == "/etc"] == ["overlay"]


# --- the test hooks are not in the shipped program (SPEC §11.10) --------------------------


@pytest.fixture(scope="module")
def production_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build.py payload, as the Debian package installs it: no test hooks."""
    from pystate_build.initrd import build_payload

    base = tmp_path_factory.mktemp("production")
    return build_payload(base / "payload", freeze_dir=base / "freeze")


def _without_sysrq(tmp: Path) -> list[str]:
    """A prefix that runs a command in its own mount namespace where /proc/sysrq-trigger
    (when the host has one) is a plain file: a test that failed could not power off the
    machine running the tests. Returns the prefix; the file is tmp/sysrq-trigger."""
    (tmp / "sysrq-trigger").write_text("")
    script = '[ ! -e /proc/sysrq-trigger ] || mount --bind "$0" /proc/sysrq-trigger; exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(tmp / "sysrq-trigger")]  # fmt: skip


TEST_WORDS = (
    "pystate.debug-stop=allocate",
    "pystate.debug-extend-pcr=7",
    "pystate.debug-resize-stop=e2fsck",
)


def test_production_program_ignores_the_test_words(
    machine: Machine, production_payload: Path
) -> None:
    """The payload a distributor ships, booted with the test build's words: each is an
    unknown option, logged and ignored; the boot is the plain one (a test build would have
    extended PCR 7 first, which fails on a machine without a TPM, and cut the power after
    provisioning's allocate)."""
    program = [*_without_sysrq(machine.tmp), str(production_payload / "pystate")]
    rc, report, log = machine.boot(f"pystate.state={machine.device}", *TEST_WORDS, program=program)
    assert rc == 0, log
    assert report["outcome"] == "ok"
    assert [s["name"] for s in report["steps"]] == [
        "config", "discover", "probe", "fsck", "mount-state", "plan", "mounts",
    ]  # fmt: skip
    for word in TEST_WORDS:
        assert f"kernel command line: unknown option {word} ignored" in log, log
    assert "extended PCR" not in log and "cutting the power" not in log, log
    assert (machine.tmp / "sysrq-trigger").read_text() == ""


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("config", [None, "[tpm2]\nrequired = yes\n"])
def test_first_boot_without_tpm_stops_and_creates_nothing(
    machine: Machine, state_tree: Path, config: str | None
) -> None:
    """SPEC §11.1: by default a first boot without a TPM stops with one clear line, and
    nothing is created on the state partition (no image, no .new, no entry, no mount point)."""
    rc, report, log = machine.boot(f"pystate.state={machine.device}", config=config)
    assert rc == 1, log
    assert report["outcome"] == "failed"
    assert report["error"].startswith("no TPM2 on this machine: the first boot cannot create ")
    assert "/etc, /var would stay on the read-only image" in report["error"]
    assert "[tpm2] required = no" in report["error"]
    assert "boot stopped: no TPM2 on this machine" in log
    assert [s["name"] for s in report["steps"]][-1] == "mount-state"
    # /state is mounted (the boot stopped after it); nothing was added to it, nothing bound.
    assert set(machine.mounts()) == {"/state"}
    assert _tree(machine.sysroot / "state") == _tree(state_tree) | {"lost+found"}


def test_first_boot_without_tpm_required_no_mounts_plain_entries_only(machine: Machine) -> None:
    rc, report, log = machine.boot(f"pystate.state={machine.device}", config=TPM_OPTIONAL)
    assert rc == 0, log
    assert report["outcome"] == "ok"
    assert "<3>pystate: no TPM2 on this machine" in log and "required = no" in log
    assert report["encrypted"] == {"state": "not provisioned: no TPM2"}
    assert set(machine.mounts()) == {"/state", "/home"}
    assert not (machine.sysroot / "state/encrypted.img").exists()
