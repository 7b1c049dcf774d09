"""The fault torture (issue 14, point 1): its pure parts on the host, a seeded slice in QEMU.

Host: blkdebug configurations (and qemu-io failing exactly the covered reads), the TPM
proxy's frame forging and descriptor swap on socketpairs with a fake swtpm, the verdicts,
the extent arithmetic. QEMU (marked ``qemu``): one disk case and one TPM case on one
provisioned machine, about 4 minutes.
"""

from __future__ import annotations

import array
import random
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import needs_root

from pystate_build import blkdebug, fault_host, fault_verdict, torture_faults, tpm_proxy

# --- blkdebug -----------------------------------------------------------------------------


def test_covering_has_one_rule_per_4k_block_touched() -> None:
    rules = blkdebug.covering("read_aio", 4096 + 100, 8192)
    assert [r.sector for r in rules] == [8, 16, 24]
    assert all(r.event == "read_aio" and r.errno == 5 and not r.once for r in rules)
    assert blkdebug.covering("write_aio", 0, 0) == []


def test_config_text_sets_the_iotype_of_the_event() -> None:
    text = blkdebug.config_text([blkdebug.Injection("write_aio", 2048, once=True)])
    assert text == (
        '[inject-error]\nevent = "write_aio"\niotype = "write"\nerrno = "5"\n'
        'sector = "2048"\nonce = "on"\n'
    )
    with pytest.raises(ValueError, match="not one of"):
        blkdebug.Injection("flush", 0)


def test_drive_spec_wraps_only_when_asked(tmp_path: Path) -> None:
    assert blkdebug.drive_spec(Path("/d.img"), None) == "file=/d.img,format=raw"
    spec = blkdebug.drive_spec(Path("/d.img"), Path("/c.conf"))
    assert spec.startswith("driver=raw,file.driver=blkdebug,file.config=/c.conf,")
    from pystate_build import qemu_harness as harness

    argv = harness.qemu_argv(
        [Path("/a.img"), Path("/b.img")], Path("/k"), None, "", 512, None,
        blkdebug={1: Path("/c.conf")},
    )  # fmt: skip
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[0].startswith("file=/a.img,format=raw,if=none,id=disk0")
    assert "file.image.filename=/b.img,if=none,id=disk1" in drives[1]


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="no qemu-io")
def test_qemu_fails_exactly_the_covered_reads(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    conf = blkdebug.write_config(tmp_path / "c.conf", blkdebug.covering("read_aio", 8192, 4096))
    spec = blkdebug.drive_spec(disk, conf).replace(",format=raw", "")

    def io(*commands: str) -> list[str]:
        argv = ["qemu-io", "--image-opts"]
        for c in commands:
            argv += ["-c", c]
        out = subprocess.run([*argv, spec], capture_output=True, text=True, check=False).stdout
        return ["failed" if "failed" in line else "ok" for line in out.splitlines()
                if line.startswith(("read", "wrote", "write"))]  # fmt: skip

    # reads touching bytes 8192-12287 fail, every time; others and writes do not
    assert io("read 0 4096", "read 8192 4096", "read 4096 8192", "write 8192 4096",
              "read 12288 4096", "read 8192 512") == [
        "ok", "failed", "failed", "ok", "ok", "failed"]  # fmt: skip


# --- the TPM proxy ------------------------------------------------------------------------


def frame(code: int, body: bytes = b"", tag: int = 0x8001) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), code) + body


def test_fault_hits_from_the_nth_for_times() -> None:
    f = tpm_proxy.Fault(0x15E, tpm_proxy.RC_RETRY, nth=2, times=2)
    assert [f.hits(n) for n in range(1, 6)] == [False, True, True, False, False]
    always = tpm_proxy.Fault(0x15E, tpm_proxy.RC_RETRY, times=0)
    assert all(always.hits(n) for n in range(1, 50))


def test_decide_counts_per_code_and_forges_a_bare_error() -> None:
    counter = tpm_proxy.Counter()
    fault = tpm_proxy.Fault(0x15E, tpm_proxy.RC_YIELDED, nth=2)
    assert tpm_proxy.decide(frame(0x15E, tag=0x8002), fault, counter) is None
    assert tpm_proxy.decide(frame(0x157), fault, counter) is None
    assert tpm_proxy.decide(frame(0x15E), fault, counter) == bytes.fromhex("80010000000a00000908")
    assert tpm_proxy.decide(frame(0x15E), fault, counter) is None
    assert counter.commands == {0x15E: 3, 0x157: 1} and counter.forged == 1
    killer = tpm_proxy.Fault(0x15E, tpm_proxy.KILL)
    assert tpm_proxy.decide(frame(0x15E), killer, tpm_proxy.Counter()) == tpm_proxy.KILL
    with pytest.raises(tpm_proxy.FrameError):
        tpm_proxy.parse_header(struct.pack(">HII", 0x8001, 3, 0))


def _fake_swtpm(tpm: socket.socket) -> None:
    """Answers every command with success and the command code as 4 bytes of body."""
    try:
        while True:
            command = tpm_proxy.read_frame(tpm)
            tpm.sendall(frame(0, command[6:10]))
    except (EOFError, OSError):
        return


def test_relay_frames_passes_forges_and_kills() -> None:
    qemu, qemu_end = socket.socketpair()
    tpm, tpm_end = socket.socketpair()
    threading.Thread(target=_fake_swtpm, args=(tpm_end,), daemon=True).start()
    killed = threading.Event()
    counter = tpm_proxy.Counter()
    fault = tpm_proxy.Fault(0x15E, tpm_proxy.RC_RETRY, times=2)
    relay = threading.Thread(
        target=tpm_proxy.relay_frames, args=(qemu_end, tpm, fault, counter, killed.set)
    )
    relay.start()
    qemu.sendall(frame(0x157, b"abc"))
    assert tpm_proxy.read_frame(qemu) == frame(0, struct.pack(">I", 0x157))
    for _ in range(2):
        qemu.sendall(frame(0x15E))
        assert tpm_proxy.read_frame(qemu) == tpm_proxy.error_response(0x922)
    qemu.sendall(frame(0x15E))  # the third passes
    assert tpm_proxy.read_frame(qemu) == frame(0, struct.pack(">I", 0x15E))
    qemu.close()
    relay.join(5)
    assert not relay.is_alive() and counter.forged == 2 and not killed.is_set()
    for s in (qemu_end, tpm, tpm_end):
        s.close()


def test_proxy_swaps_the_data_descriptor_qemu_passes(tmp_path: Path) -> None:
    """A fake swtpm control socket; the fake QEMU passes a socketpair end as CMD_SET_DATAFD
    (SCM_RIGHTS), as QEMU's tpm-emulator does, and talks TPM frames over its own end."""
    ctrl = tmp_path / "swtpm.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(ctrl))
    listener.listen(1)

    def swtpm_control() -> None:
        conn, _ = listener.accept()
        data, anc, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(4))
        fds = array.array("i")
        fds.frombytes(anc[0][2][:4])
        conn.sendall(b"\0\0\0\0")  # ptm_res 0: the descriptor was taken
        _fake_swtpm(socket.socket(fileno=fds[0]))

    threading.Thread(target=swtpm_control, daemon=True).start()
    fault = tpm_proxy.Fault(0x15E, tpm_proxy.RC_LOCKOUT, nth=2)
    with tpm_proxy.proxy(ctrl, fault) as path:
        qemu = socket.socket(socket.AF_UNIX)
        qemu.connect(str(path))
        mine, theirs = socket.socketpair()
        cmd_set_datafd = struct.pack(">I", 16)
        qemu.sendmsg(
            [cmd_set_datafd],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))],
        )
        theirs.close()
        assert tpm_proxy.read_exact(qemu, 4) == b"\0\0\0\0"
        mine.sendall(frame(0x15E))
        assert tpm_proxy.read_frame(mine) == frame(0, struct.pack(">I", 0x15E))
        mine.sendall(frame(0x15E))
        assert tpm_proxy.read_frame(mine) == tpm_proxy.error_response(0x921)
        qemu.close()
        mine.close()
    listener.close()


# --- verdicts and arithmetic ---------------------------------------------------------------

IDENTITY = {"luks_uuid": "u1", "key_digests": "d1", "home_marker": "m", "names": ("home",)}


def test_outcomes() -> None:
    assert fault_verdict.outcome("x\nRT-DONE\n") == "recovered"
    assert fault_verdict.outcome("key (try 1 of 3): \nRT-DONE") == "prompt+recovered"
    assert fault_verdict.outcome("(try 1 of 3)") == "prompt"
    assert fault_verdict.outcome("pystate: stop", timed_out=True) == "timeout"
    assert fault_verdict.outcome("Traceback (most recent call last)\nRT-DONE") == "traceback"
    assert fault_verdict.outcome("[ 1.0] pystate: LUKS2 header damaged") == "stopped"


def test_verdict_refuses_a_reformat_a_new_key_and_a_lost_marker() -> None:
    def check(after: dict[str, object], console: str = "RT-DONE") -> tuple[str, bool, str]:
        seen = fault_verdict.Seen(console, before=IDENTITY, after=after)
        return fault_verdict.verdict(seen, ("recovered", "stopped"))

    assert check(IDENTITY)[1] is True
    assert "LUKS UUID u1 -> u2" in check({**IDENTITY, "luks_uuid": "u2"})[2]
    assert "digest" in check({**IDENTITY, "key_digests": "d2"})[2]
    assert "marker" in check({**IDENTITY, "home_marker": None})[2]
    result = check(IDENTITY, "Traceback (most recent call last)")
    assert result[:2] == ("traceback", False) and "not one of" in result[2]
    stopped = check(IDENTITY, "[  3.1] pystate: TPM2 on x is busy and refused the unseal\n")
    assert stopped == ("stopped", True, "pystate: TPM2 on x is busy and refused the unseal")


def test_a_provisioning_fault_may_leave_no_image_but_not_a_broken_one() -> None:
    before = {"home_marker": "m"}
    none = {"luks_uuid": None, "home_marker": "m", "names": ("encrypted.img.new", "home")}
    broken = {"luks_uuid": None, "home_marker": "m", "names": ("encrypted.img", "home")}
    assert fault_verdict.state_problems(fault_verdict.Seen("", before=before, after=none,
                                                           fresh=True)) == []  # fmt: skip
    assert fault_verdict.state_problems(
        fault_verdict.Seen("", before=before, after=broken, fresh=True)
    ) == ["an encrypted.img that is no LUKS2 image was left"]


def test_row_has_the_columns_torture_py_reads() -> None:
    case = torture_faults.select({"disk"}, ["gpt-read"])[0]
    console = "[ 2.0] I/O error, dev vda, sector 1 op 0x0:(READ)\nRT-DONE\n"
    r = torture_faults.row(case, fault_verdict.Seen(console, before=IDENTITY, after=IDENTITY),
                           "1 rule(s)", 61.04)  # fmt: skip
    assert set(r) == {"kind", "case", "injected", "outcome", "ok", "detail", "seconds"}
    assert r["ok"] is True and r["injected"] == "1 I/O error(s); 1 rule(s)"
    assert r["seconds"] == 61.0
    assert {c.kind for c in torture_faults.CASES} == set(torture_faults.KINDS)
    with pytest.raises(ValueError, match="unknown"):
        torture_faults.select({"net"})


def test_full_problems_name_each_broken_promise() -> None:
    good = {
        "home_error": "ENOSPC", "var_error": "ENOSPC", "rewrite_errors": [], "lost": [],
        "errors": [], "reserve_broken": [], "fsck": {"status": 0}, "timed_out": False,
    }  # fmt: skip
    assert torture_faults.full_problems(good) == []
    bad = {**good, "var_error": "EIO", "errors": ["Buffer I/O error on dev dm-0"]}
    problems = torture_faults.full_problems(bad)
    assert "var writer ended with EIO, not ENOSPC" in problems
    assert any("kernel" in p for p in problems)
    assert torture_faults.full_problems(None) == ["the guest printed no RT-FULL"]
    note = torture_faults.full_note({
        **good, "home_started": 12.5, "home_files": 3, "var_files": 2, "rewrites": 9,
        "start": {"image": 300 << 20}, "end": {"image": 400 << 20, "outer_free": 3 << 20},
        "images": [1, 2, 3], "reserve": 256 << 20,
    })  # fmt: skip
    assert note == (
        "home from 12.5 s: 24 MiB (ENOSPC), var 16 MiB (ENOSPC), 9 rewrite rounds, "
        "image 300->400 MiB (3 sizes seen), outer free 3 MiB, reserve 256 MiB, inner fsck 0"
    )


def test_filefrag_extents_map_to_disk_ranges() -> None:
    text = (
        "Filesystem type is: ef53\nFile size of x is 8388608 (16384 blocks of 512 bytes)\n"
        " ext:     logical_offset:        physical_offset: length:   expected: flags:\n"
        "   0:        0..    8191:      69632..     77823:   8192:            \n"
        "   1:     8192..   16383:     98304..    106495:   8192:      77824: last,eof\n"
    )
    extents = fault_host.parse_filefrag(text)
    assert extents == [(0, 69632 * 512, 4 << 20), (4 << 20, 98304 * 512, 4 << 20)]
    start = 1 << 20
    # 4 KiB straddling the two extents
    assert fault_host.disk_ranges(extents, start, (4 << 20) - 2048, 4096) == [
        (start + 69632 * 512 + (4 << 20) - 2048, 2048), (start + 98304 * 512, 2048)]  # fmt: skip


# --- regressions the torture found (host) ---------------------------------------------------


def test_an_unreadable_inner_superblock_is_named_an_io_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """disk inner-fs-read: an I/O error on the opened image's first block stopped the boot
    with "holds no ext4 or btrfs file system: the image's content is damaged" (restore from
    a backup!), a wrong diagnosis; it now names the read error."""
    from pystate_initrd.system import block
    from pystate_initrd.volume import stack

    device = tmp_path / "dm"
    device.write_bytes(bytes(8192))

    def eio(fd: int, n: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stack, "DM_PATH", str(device))
    monkeypatch.setattr(block.os, "pread", eio)
    with pytest.raises(stack.VolumeError, match="cannot read .*Input/output error") as info:
        stack.check_inner()
    assert "damaged" not in str(info.value) and "I/O error" in info.value.hint
    monkeypatch.undo()
    monkeypatch.setattr(stack, "DM_PATH", str(device))  # zeros: still "damaged"
    with pytest.raises(stack.VolumeError, match="holds no ext4 or btrfs file system"):
        stack.check_inner()


# --- QEMU: the CI slice -------------------------------------------------------------------


@pytest.mark.qemu
@needs_root
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU")
def test_seeded_slice_in_qemu(tmp_path: Path) -> None:
    rows = torture_faults.run(
        {"disk", "tpm"}, random.Random(14), tmp_path, only=["luks-header-read", "retry-always"]
    )
    assert [r["case"] for r in rows] and len(rows) == 2
    for r in rows:
        assert r["ok"], r
