"""The QEMU + swtpm harness (qemu/boot, pystate_build/qemu_harness.py), no pystate in the initrd.

Most cases boot a tiny initramfs (busybox as /init) straight from the kernel, a few seconds
each: power-off, a missing marker, answers to console prompts, the TPM shared through
--tpm-state. One case boots the minimal test root through a plain dracut initrd from a GPT
disk; panics and timeouts must end the boot quickly with a non-zero status.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, needs_root

from pystate_build import qemu_harness as harness
from pystate_build.disk import build_disk
from pystate_build.initrd_plain import build_plain_initrd
from pystate_build.kernel import ensure_kernel
from pystate_build.roots import TESTROOT_MARKER, build_testroot, parse_report

pytestmark = [
    pytest.mark.qemu,
    needs_root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

BOOT = REPO / "qemu/boot"
TINY_OK = "TINY-OK"

# /init of the tiny initramfs: optional TPM2_ReadClock (its resetCount shows whether two
# boots shared one TPM), optional prompts, then power-off.
TINY_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "TINY-START"
cmdline="$(cat /proc/cmdline)"
if [ -c /dev/tpm0 ]; then
	exec 3<>/dev/tpm0
	printf '\200\001\000\000\000\012\000\000\001\201' >&3
	echo "TINY-TPM $(dd bs=64 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \n')"
	exec 3<&-
else
	echo "TINY-NO-TPM"
fi
case " $cmdline " in
*" tiny.ask "*)
	printf 'Recovery key: '
	read -r key
	echo "TINY-GOT [$key]"
	printf 'Second question: '
	read -r key
	echo "TINY-GOT2 [$key]"
	;;
esac
case " $cmdline " in
*" tiny.hang "*) while :; do sleep 1; done ;;
esac
echo "TINY-OK"
poweroff -f
"""


def newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio newc archive of (name, mode, data, rdev) entries (no cpio binary needed)."""
    out = bytearray()

    def pad(n: int) -> None:
        out.extend(b"\0" * (-len(out) % 4))
        del n

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev)]
        out += b"070701" + b"".join(b"%08X" % f for f in fields)
        out += b"%08X%08X" % (len(raw), 0) + raw
        pad(0)
        out += data
        pad(0)
    return bytes(out)


@pytest.fixture(scope="session")
def kernel() -> Path:
    return ensure_kernel().vmlinuz


@pytest.fixture(scope="session")
def tiny_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("busybox-static is not installed")
    entries = [
        ("bin", 0o40755, b"", 0),
        ("bin/busybox", 0o100755, busybox.read_bytes(), 0),
        ("dev", 0o40755, b"", 0),
        ("dev/console", 0o20600, b"", os.makedev(5, 1)),
        ("init", 0o100755, TINY_INIT.encode(), 0),
    ]
    path = tmp_path_factory.mktemp("tiny") / "tiny.cpio"
    path.write_bytes(newc(entries))
    return path


@pytest.fixture(scope="session")
def blank_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blank") / "blank.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


def tpm_reset_count(result: harness.BootResult) -> int:
    """resetCount from the TPM2_ReadClock response printed by the tiny init."""
    (line,) = result.lines_with("TINY-TPM ")
    hexdata = line.split("TINY-TPM ", 1)[1].strip()
    response = bytes.fromhex(hexdata)
    assert response[6:10] == b"\0\0\0\0", f"TPM2_ReadClock failed: {hexdata}"
    return int.from_bytes(response[26:30], "big")  # header 10 + time 8 + clock 8


def run_boot(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BOOT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_no_leftovers(before: set[int]) -> None:
    """No QEMU or swtpm process that this test started is still running."""
    time.sleep(0.2)
    now = {p for p in _pids("qemu-system-x86_64") | _pids("swtpm")}
    assert now <= before, f"left running: {sorted(now - before)}"


def _pids(name: str) -> set[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture
def no_leftovers():  # type: ignore[no-untyped-def]
    before = _pids("qemu-system-x86_64") | _pids("swtpm")
    yield
    assert_no_leftovers(before)


# --- tiny initramfs boots: the harness mechanics ---------


@pytest.mark.usefixtures("no_leftovers")
def test_power_off_with_tpm_and_shared_state(
    kernel: Path, tiny_initrd: Path, blank_disk: Path, tmp_path: Path
) -> None:
    state = tmp_path / "tpm"
    first = harness.boot(
        blank_disk, kernel=kernel, initrd=tiny_initrd, tpm_state=state, expect=[TINY_OK],
        timeout=120,
    )  # fmt: skip
    assert first.ok, harness.describe(first)
    assert first.returncode == harness.OK and first.reason == ""
    assert "TINY-START" in first.console and TINY_OK in first.console
    assert any(state.iterdir()), "swtpm kept no state in --tpm-state"
    second = harness.boot(
        blank_disk, kernel=kernel, initrd=tiny_initrd, tpm_state=state, timeout=120
    )
    assert second.ok, harness.describe(second)
    fresh = harness.boot(blank_disk, kernel=kernel, initrd=tiny_initrd, timeout=120)
    assert fresh.ok, harness.describe(fresh)
    # One TPM across boots sharing --tpm-state: its reset counter keeps counting.
    assert tpm_reset_count(second) > tpm_reset_count(first)
    assert tpm_reset_count(fresh) == tpm_reset_count(first)


@pytest.mark.usefixtures("no_leftovers")
def test_no_tpm(kernel: Path, tiny_initrd: Path, blank_disk: Path) -> None:
    result = harness.boot(blank_disk, kernel=kernel, initrd=tiny_initrd, tpm=False, timeout=120)
    assert result.ok, harness.describe(result)
    assert "TINY-NO-TPM" in result.console


@pytest.mark.usefixtures("no_leftovers")
def test_answers_to_prompts_and_log(
    kernel: Path, tiny_initrd: Path, blank_disk: Path, tmp_path: Path
) -> None:
    log = tmp_path / "console.log"
    proc = run_boot(
        str(blank_disk), "--kernel", str(kernel), "--initrd", str(tiny_initrd), "--no-tpm",
        "--append", "tiny.ask", "--timeout", "120", "--log", str(log), "--expect", TINY_OK,
        "--answer", "Recovery key:=cbdefghi-jklnrtuv", "--answer", "question:=two words=x",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "TINY-GOT [cbdefghi-jklnrtuv]" in proc.stdout
    assert "TINY-GOT2 [two words=x]" in proc.stdout
    assert "TINY-GOT [cbdefghi-jklnrtuv]" in log.read_text()
    assert "powered off" in proc.stderr


@pytest.mark.usefixtures("no_leftovers")
def test_missing_marker(kernel: Path, tiny_initrd: Path, blank_disk: Path) -> None:
    proc = run_boot(
        str(blank_disk), "--kernel", str(kernel), "--initrd", str(tiny_initrd), "--no-tpm",
        "--timeout", "120", "--expect", TINY_OK, "--expect", "NEVER-PRINTED",
    )  # fmt: skip
    assert proc.returncode == harness.MARKER_MISSING, proc.stderr
    assert "'NEVER-PRINTED'" in proc.stderr
    assert "last 40 console lines" in proc.stderr


@pytest.mark.usefixtures("no_leftovers")
def test_timeout_is_quick(kernel: Path, tiny_initrd: Path, blank_disk: Path) -> None:
    start = time.monotonic()
    proc = run_boot(
        str(blank_disk), "--kernel", str(kernel), "--initrd", str(tiny_initrd),
        "--append", "tiny.hang", "--timeout", "5",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == harness.TIMEOUT, proc.stderr
    assert "timed out after 5 s" in proc.stderr
    assert elapsed < 20


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("panic", ["panic=-1", "panic=1"])  # hang after the panic / reboot
def test_kernel_panic(kernel: Path, blank_disk: Path, panic: str) -> None:
    # no initrd and a root that does not exist: "VFS: Unable to mount root fs"
    start = time.monotonic()
    proc = run_boot(
        str(blank_disk), "--kernel", str(kernel), "--append", f"root=/dev/nowhere {panic}",
        "--timeout", "120",
    )  # fmt: skip
    assert proc.returncode == harness.GUEST_FAILED, proc.stderr
    assert "FAILED (kernel panic)" in proc.stderr
    assert "Kernel panic - not syncing" in proc.stderr  # the tail is printed
    assert time.monotonic() - start < 90


def test_missing_file_is_a_harness_error(tmp_path: Path) -> None:
    proc = run_boot(str(tmp_path / "nope.img"), "--kernel", "/dev/null")
    assert proc.returncode == harness.QEMU_FAILED
    assert "nope.img: no such file" in proc.stderr


def test_answer_parse() -> None:
    assert harness.Answer.parse("Recovery key:=abc") == harness.Answer("Recovery key:", "abc")
    assert harness.Answer.parse("a=b=c") == harness.Answer("a", "b=c")
    assert harness.Answer.parse("prompt=") == harness.Answer("prompt", "")
    for bad in ("nothing", "=reply"):
        with pytest.raises(ValueError):
            harness.Answer.parse(bad)


# --- a real disk through a plain dracut initrd ---------


@pytest.mark.usefixtures("no_leftovers")
def test_boot_testroot_from_gpt_disk(tmp_path: Path) -> None:
    root = build_testroot(tmp_path / "root", lists=["/home", "/etc/hostname"])
    state = tmp_path / "state"
    (state / "home").mkdir(parents=True)
    layout = build_disk(tmp_path / "disk.img", root, state, state_size=256 << 20)
    assert layout.root is not None
    initrd = build_plain_initrd()
    result = harness.boot(
        layout.path,
        initrd=initrd,
        append=f"root=PARTUUID={layout.root.uuid} rootfstype=erofs ro quiet",
        expect=[TESTROOT_MARKER],
        timeout=300,
        log=tmp_path / "console.log",
    )
    assert result.ok, harness.describe(result)
    mounts, listed, files = parse_report(result.console)
    assert mounts[[m[1] for m in mounts].index("/")][:3] == ["/dev/vda1", "/", "erofs"]
    assert listed["/home"] == ("755", "0:0", "directory")
    assert files["/etc/hostname"] == "pystate-testroot"
    print(f"\ntestroot boot: {result.duration:.1f} s")
    (tmp_path / "layout.json").write_text(layout.to_json())
    assert json.loads(layout.to_json())["partitions"][0]["role"] == "root"
    assert re.search(r"reboot: Power down", result.console)


@pytest.mark.usefixtures("no_leftovers")
def test_sigterm_stops_qemu_and_swtpm(kernel: Path, tiny_initrd: Path, blank_disk: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(BOOT), str(blank_disk), "--kernel", str(kernel),
         "--initrd", str(tiny_initrd), "--append", "tiny.hang", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not any(_children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(_children(proc.pid)), "qemu/boot started neither swtpm nor QEMU"
    time.sleep(1)
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]
