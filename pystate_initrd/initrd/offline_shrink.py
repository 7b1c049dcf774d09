"""The initrd half of an ext4 shrink: carry out a validated request before mounting.

The resize service cannot shrink a mounted ext4, so it leaves a request in
``<state>/.pystate/shrink-request`` (request_file.write_request). At the next boot, after the
image is unlocked and checked and before its file system is mounted, the boot calls
``apply_pending_shrink()``:

  validate (form, LUKS UUID, sizes against the image) -> e2fsck -f -> used + margin,
  measured offline -> resize2fs -> crypt_resize (size) -> truncate -> loop capacity
  -> remove the request.

The request lies on the unencrypted partition, so it is untrusted: anything that does
not validate is logged and removed, never acted on; the worst a forged valid request
can do is shrink the image to what its own data plus the margin need, which the service
grows back. The request is removed only at the end, so a power cut anywhere before
that repeats the shrink at the next boot (resize2fs to the size it already has does
nothing), and a cut after the truncate finds the request stale (the image is no longer
the size it was made for) and removes it. docs/resize.md has the table.

After each step (e2fsck, resize2fs, crypt-resize, truncate, loop-capacity) a test build may
cut the power for the crash tests (volume/hooks.py); the shipped program does nothing there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pystate_initrd.config import Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import resize_policy, superblock
from pystate_initrd.formats.names import DM_NAME, IMAGE
from pystate_initrd.formats.resize_policy import human_size
from pystate_initrd.formats.shrink_request import (
    RequestError,
    ShrinkRequest,
    parse_request,
    validate_request,
)
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.system import block, fsck, loopdev, luks
from pystate_initrd.system.run import CommandError, run
from pystate_initrd.volume.hooks import Hook, offline_shrink_hook
from pystate_initrd.volume.policy import params_from_config
from pystate_initrd.volume.request_file import read_request, remove_request
from pystate_initrd.volume.resize import crypt_resize

OFFLINE_STEPS = ("e2fsck", "resize2fs", "crypt-resize", "truncate", "loop-capacity")


class OfflineShrinkError(PystateError):
    """The shrink failed in a way that leaves the file system needing a person."""


def read_ext4_usage(device: str) -> superblock.Ext4Usage:
    usage = superblock.ext4_usage(block.read_head(device))
    if usage is None:
        raise OfflineShrinkError(f"{device} holds no ext4 superblock")
    return usage


def check_fs_bounds(req: ShrinkRequest, usage: superblock.Ext4Usage, margin_of: int) -> str | None:
    """Why fs_size is too small for the data measured offline (pure); None if it fits."""
    if req.fs_size < usage.used + margin_of:
        return (
            f"fs_size {human_size(req.fs_size)} is below used {human_size(usage.used)} + "
            f"margin {human_size(margin_of)}"
        )
    return None


def apply_pending_shrink(
    cfg: Config,
    state_dir: Path,
    loop: str,
    report: BootReport,
    *,
    device: str | None = None,
    crypt_name: str | None = DM_NAME,
    cmdline: str | None = None,
) -> str | None:
    """Carry out <state>/.pystate/shrink-request on the opened, unmounted image.

    None when there is no request; else one line saying what was done or why the request
    was dropped. Raises OfflineShrinkError only when resize2fs failed and the file system
    no longer passes e2fsck -p (the boot must stop, as for any failing inner fsck).
    """
    log = report.log
    device = device or (f"/dev/mapper/{crypt_name}" if crypt_name else loop)
    try:
        data = read_request(state_dir)
    except RequestError as exc:
        return _drop(state_dir, log, str(exc))
    if data is None:
        return None
    if cmdline is None:
        try:
            cmdline = Path("/proc/cmdline").read_text(errors="replace")
        except OSError:
            cmdline = ""
    hook = offline_shrink_hook(cmdline, log.error)
    with report.step("offline-shrink") as s:
        try:
            s.detail = _apply(cfg, state_dir, loop, device, crypt_name, data, report, hook)
        except OfflineShrinkError:
            raise
        except (PystateError, OSError) as exc:
            # Every step leaves the image consistent (the order of steps), and the request
            # stays for the next boot: a failed shrink is no reason to stop this boot.
            reason = getattr(exc, "strerror", None) or str(exc)
            s.detail = f"shrink not finished, the boot goes on: {reason}"
            log.error(s.detail)
        return s.detail


def _drop(state_dir: Path, log: Log, why: str) -> str:
    remove_request(state_dir)
    line = f"shrink request ignored and removed: {why}"
    log.warning(line)
    return line


def _apply(
    cfg: Config,
    state_dir: Path,
    loop: str,
    device: str,
    crypt_name: str | None,
    data: bytes,
    report: BootReport,
    step: Hook,
) -> str:
    log = report.log
    image = state_dir / IMAGE
    try:
        req = parse_request(data)
    except RequestError as exc:
        return _drop(state_dir, log, str(exc))
    params = params_from_config(cfg)
    if crypt_name is not None:
        header = luks.read_header(image)
        uuid, offset = header.uuid, header.data_offset
    else:
        uuid, offset = req.luks_uuid, 0  # no LUKS (host tests): nothing to match
    image_size = os.stat(image).st_size
    if req.size == image_size:
        return _drop(state_dir, log, f"already carried out: the image is {human_size(req.size)}")
    why = validate_request(
        req,
        luks_uuid=uuid,
        header=offset,
        image_size=image_size,
        min_image_size=params.min_image_size,
    )
    if why:
        return _drop(state_dir, log, why)
    try:
        fstype = block.probe(device).fstype
    except block.FsProbeError as exc:
        return _drop(state_dir, log, str(exc))
    if fstype != "ext4":
        return _drop(state_dir, log, f"the image holds {fstype}, which shrinks online")

    begin = time.monotonic()
    timings: list[str] = []

    def timed(name: str, t0: float) -> None:
        timings.append(f"{name} {(time.monotonic() - t0) * 1000:.0f} ms")
        step(name)

    t0 = time.monotonic()
    proc = run(["e2fsck", "-f", "-p", device], check=False)
    if fsck.verdict_for_status(proc.returncode) not in (fsck.Verdict.CLEAN, fsck.Verdict.CORRECTED):
        last = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
        return _drop(
            state_dir,
            log,
            f"e2fsck -f {device} exited {proc.returncode} ({last[-1] if last else 'no output'})"
            ": not shrinking a file system with errors",
        )
    timed("e2fsck", t0)
    usage = read_ext4_usage(device)
    margin = resize_policy.margin(usage.used, params)
    why = check_fs_bounds(req, usage, margin)
    if why:
        return _drop(state_dir, log, why)

    t0 = time.monotonic()
    try:
        run(["resize2fs", device, f"{req.fs_size // 1024}K"])
    except CommandError as exc:
        # resize2fs refuses before it starts (size below its minimum) or fails midway;
        # either way the file system must pass a check before it is mounted.
        remove_request(state_dir)
        log.error(f"resize2fs failed, shrink request removed: {exc}")
        try:
            fsck.check(device, "ext4")
        except fsck.FsckError as err:
            raise OfflineShrinkError(
                f"the encrypted file system is damaged after a failed shrink: {err}",
                hint=f"run 'e2fsck {device}' from the emergency shell",
            ) from None
        return f"resize2fs failed, nothing else changed: {exc}"
    timed("resize2fs", t0)
    now = read_ext4_usage(device).size
    if now > req.fs_size:
        return _drop(state_dir, log, f"resize2fs left the file system at {now} B; not truncating")

    t0 = time.monotonic()
    if crypt_name is not None:
        crypt_resize(crypt_name, req.fs_size)
    timed("crypt-resize", t0)
    t0 = time.monotonic()
    os.sync()  # the shrunk file system reaches the image before the image loses its tail
    fd = os.open(image, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, req.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    timed("truncate", t0)
    t0 = time.monotonic()
    loopdev.loop_set_capacity(loop)
    timed("loop-capacity", t0)
    remove_request(state_dir)
    seconds = time.monotonic() - begin
    line = (
        f"shrank {image} {human_size(image_size)} -> {human_size(req.size)} in {seconds:.2f} s "
        f"(used {human_size(usage.used)}; {', '.join(timings)})"
    )
    log.notice(line)
    return line
