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
import uuid as uuid_mod
from dataclasses import replace
from pathlib import Path

from pystate_initrd.config import Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import resize_policy, shrink_scratch, superblock
from pystate_initrd.formats.names import DM_NAME, IMAGE
from pystate_initrd.formats.resize_policy import human_size
from pystate_initrd.formats.shrink_progress import (
    MAX_ATTEMPTS,
    Action,
    Progress,
    Step,
    Undo,
    decide,
)
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
from pystate_initrd.volume import undo_file
from pystate_initrd.volume.hooks import Hook, offline_shrink_hook
from pystate_initrd.volume.policy import params_from_config
from pystate_initrd.volume.request_file import (
    read_progress,
    read_request,
    remove_progress,
    remove_request,
    write_progress,
)
from pystate_initrd.volume.resize import crypt_resize
from pystate_initrd.volume.scratch import EncryptedScratch, ScratchError, UndoArea

OFFLINE_STEPS = (
    "e2fsck", "undo-area", "resize2fs", "undo-remove", "crypt-resize", "truncate",
    "loop-capacity",
)  # fmt: skip
# Called with this name just before resize2fs starts: a test build may cut the power while
# it runs (testhooks: pystate.debug-resize-stop=resize2fs-running).
RESIZE2FS_START = "resize2fs-start"


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
    undo_area: UndoArea | None = None,
) -> str | None:
    """Carry out <state>/.pystate/shrink-request on the opened, unmounted image.

    undo_area: where resize2fs's undo file goes; by default the encrypted area on /state
    keyed from the opened mapping's volume key (volume/scratch.py).

    None when there is no request; else one line saying what was done or why the request
    was dropped. Raises OfflineShrinkError only when resize2fs failed and the file system
    no longer passes e2fsck -p (the boot must stop, as for any failing inner fsck).
    """
    log = report.log
    device = device or (f"/dev/mapper/{crypt_name}" if crypt_name else loop)
    area = undo_area or EncryptedScratch(state_dir)
    try:
        data = read_request(state_dir)
    except RequestError as exc:
        return _drop(state_dir, log, str(exc))
    if data is None:
        _forget_progress(state_dir, area)
        return None
    if cmdline is None:
        try:
            cmdline = Path("/proc/cmdline").read_text(errors="replace")
        except OSError:
            cmdline = ""
    hook = offline_shrink_hook(cmdline, log.error)
    with report.step("offline-shrink") as s:
        try:
            s.detail = _apply(cfg, state_dir, loop, device, crypt_name, data, report, hook, area)
        except OfflineShrinkError:
            raise
        except (PystateError, OSError) as exc:
            # Every step leaves the image consistent (the order of steps), and the request
            # stays for the next boot: a failed shrink is no reason to stop this boot.
            reason = getattr(exc, "strerror", None) or str(exc)
            s.detail = f"shrink not finished, the boot goes on: {reason}"
            log.error(s.detail)
        if read_request(state_dir) is None:
            _forget_progress(state_dir, area)
        return s.detail


def _forget_progress(state_dir: Path, area: UndoArea) -> None:
    """No request left: the progress file and the undo area are done with (a given-up
    marker stays: it stops the same shrink from being asked for again)."""
    progress = read_progress(state_dir)
    if isinstance(progress, Progress) and progress.step is Step.GIVEN_UP:
        return
    if area.exists():
        area.remove()
    if progress is not None:
        remove_progress(state_dir)


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
    area: UndoArea,
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
    prev = read_progress(state_dir)
    same = isinstance(prev, Progress) and (prev.luks_uuid, prev.current, prev.size) == (
        req.luks_uuid,
        req.current,
        req.size,
    )
    if isinstance(prev, Progress) and prev.step is Step.GIVEN_UP:
        if prev.luks_uuid == req.luks_uuid and prev.current == image_size:
            return _drop(
                state_dir,
                log,
                f"a shrink of this {human_size(image_size)} image was cut off {MAX_ATTEMPTS} "
                f"times and given up; remove {state_dir}/.pystate/shrink-progress to try again",
            )
        remove_progress(state_dir)  # the image changed size since: a new start
    attempt = prev.attempt + 1 if same and isinstance(prev, Progress) else 1
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

    info = superblock.identify(block.read_head(device))
    fs_uuid = str(info.uuid) if info else ""
    nonce = os.urandom(shrink_scratch.NONCE_BYTES)
    progress = Progress(
        req.luks_uuid, fs_uuid, req.current, req.size, Step.SCRATCH, attempt, nonce.hex()
    )
    if attempt > MAX_ATTEMPTS:
        write_progress(state_dir, _given_up(progress, image_size))
        return _drop(state_dir, log, f"cut off {MAX_ATTEMPTS} times already: given up")
    # The undo area's worst case must fit on /state (it is sparse: usually far less is used).
    need = shrink_scratch.undo_bound(usage.used, usage.size, req.fs_size)
    st = os.statvfs(state_dir)
    if st.f_bavail * st.f_frsize < need + shrink_scratch.OVERHEAD:
        return _drop(
            state_dir,
            log,
            f"/state has {human_size(st.f_bavail * st.f_frsize)} free, and the undo area may "
            f"need {human_size(need + shrink_scratch.OVERHEAD)}: not shrinking without room "
            "for it",
        )
    # The nonce first (a cut while the area is made leaves a progress file that says so),
    # then the area, then "resize2fs" (see recover_interrupted_shrink).
    write_progress(state_dir, progress)
    t0 = time.monotonic()
    try:
        where = area.make(nonce, shrink_scratch.scratch_size(usage.used, usage.size, req.fs_size))
        undo_fd = undo_file.create(where)
    except (ScratchError, OSError) as exc:
        area.remove()
        remove_progress(state_dir)
        return _drop(
            state_dir,
            log,
            f"cannot make the undo file in {area.describe()} "
            f"({getattr(exc, 'strerror', None) or exc}): not shrinking without one",
        )
    timed("undo-area", t0)
    progress = replace(progress, step=Step.RESIZE2FS)
    write_progress(state_dir, progress)
    t0 = time.monotonic()
    try:
        step(RESIZE2FS_START)
        run(
            ["resize2fs", "-z", f"/proc/self/fd/{undo_fd}", device, f"{req.fs_size // 1024}K"],
            pass_fds=[undo_fd],
        )
    except CommandError as exc:
        # resize2fs refused before it started (size below its minimum) or failed midway:
        # what it changed is rolled back, and the file system must pass a check before it
        # is mounted.
        os.close(undo_fd)
        remove_request(state_dir)
        log.error(f"resize2fs failed, shrink request removed: {exc}")
        undone = _roll_back(where, device, log)
        if "e2undo refused" in undone:
            area.close()  # kept, with the progress file, for a person (the boot stops)
            raise OfflineShrinkError(
                f"resize2fs failed and its undo file was refused: {undone}",
                hint="nothing more was changed; the undo area and the progress file are kept",
            ) from None
        area.remove()
        remove_progress(state_dir)
        try:
            fsck.check(device, "ext4")
        except fsck.FsckError as err:
            raise OfflineShrinkError(
                f"the encrypted file system is damaged after a failed shrink: {err}",
                hint=f"run 'e2fsck {device}' from the emergency shell",
            ) from None
        return f"resize2fs failed, {undone}: {exc}"
    os.close(undo_fd)
    write_progress(state_dir, replace(progress, step=Step.RESIZED))
    timed("resize2fs", t0)
    undo_bytes = os.stat(undo_file.path(where)).st_size
    t0 = time.monotonic()
    taken = area.remove()
    timed("undo-remove", t0)
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
    remove_progress(state_dir)
    timings.append(f"undo file {human_size(undo_bytes)}, {human_size(taken)} on /state")
    seconds = time.monotonic() - begin
    line = (
        f"shrank {image} {human_size(image_size)} -> {human_size(req.size)} in {seconds:.2f} s "
        f"(used {human_size(usage.used)}; {', '.join(timings)})"
    )
    log.notice(line)
    return line


def _given_up(progress: Progress, image_size: int) -> Progress:
    return replace(progress, step=Step.GIVEN_UP, current=image_size, attempt=MAX_ATTEMPTS)


def e2undo_argv(undo_fd: int, device: str) -> list[str]:
    """e2undo on pystate's undo file, never with -f: a superblock that does not match, a
    bad key or data checksum makes it refuse before it writes anything (misc/e2undo.c)."""
    return ["e2undo", f"/proc/self/fd/{undo_fd}", device]


def _roll_back(where: Path, device: str, log: Log) -> str:
    """Apply the undo file in where if it is a usable one; one line saying what happened
    ("e2undo refused" in it when e2undo did not apply it)."""
    info = superblock.identify(block.read_head(device))
    kind, why = undo_file.inspect(where, {info.uuid} if info else set())
    if kind is Undo.DAMAGED or kind is Undo.FOREIGN:
        return f"e2undo refused: not run on an undo file pystate refuses ({why})"
    if kind is not Undo.VALID:
        return f"nothing to roll back ({why})"
    fd = undo_file.open_existing(where)
    assert fd is not None
    try:
        t0 = time.monotonic()
        proc = run(e2undo_argv(fd, device), check=False, pass_fds=[fd])
    finally:
        os.close(fd)
    out = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        line = f"e2undo refused the undo file ({out[-1] if out else 'no output'})"
        log.error(line)
        return line
    return f"rolled back with e2undo in {(time.monotonic() - t0) * 1000:.0f} ms ({why})"


def _inspect_area(
    area: UndoArea, progress: Progress | str | None, uuids: set[uuid_mod.UUID]
) -> tuple[Undo, str, Path | None]:
    """What the undo area holds; opened (and left open: its directory returned) only when
    a cut-off resize2fs may need it. The area is opened with the key derived from the
    progress file's nonce: anything not made by this image's boot for this shrink does not
    open or does not mount, and is DAMAGED."""
    if not area.exists():
        return Undo.ABSENT, "no undo area", None
    if isinstance(progress, str):  # no nonce to open it with, and resize2fs may have run
        return Undo.DAMAGED, "an undo area is there, not opened without a progress file", None
    if progress is None or progress.step is not Step.RESIZE2FS:
        return Undo.EMPTY, "undo area not needed", None
    try:
        where = area.open(bytes.fromhex(progress.nonce))
    except ScratchError as exc:
        return Undo.DAMAGED, str(exc), None
    kind, why = undo_file.inspect(where, uuids)
    return kind, why, where


def recover_interrupted_shrink(
    state_dir: Path,
    device: str,
    report: BootReport,
    *,
    luks_uuid: str = "",
    undo_area: UndoArea | None = None,
) -> str | None:
    """Before the inner file system is checked: deal with a shrink a crash cut off.

    formats/shrink_progress.decide() says what (docs/resize.md has the table): roll a
    cut-off resize2fs back with e2undo from the encrypted undo area, go on from a finished
    one, give up a shrink cut off twice. Never reformats; never runs e2undo -f. None when
    no shrink was under way. Raises OfflineShrinkError when resize2fs was cut off and its
    undo file cannot be used (the area does not open with this image's key, the file is
    damaged or for another file system, or e2undo refuses it): the file system may be
    half-shrunk, and nothing is changed before a person has looked (the area and the
    progress file are kept); and when, without a valid progress file, e2fsck -p cannot
    repair the file system.
    """
    log = report.log
    area = undo_area or EncryptedScratch(state_dir)
    progress = read_progress(state_dir)
    info = superblock.identify(block.read_head(device))
    device_uuid = info.uuid if info else None
    if isinstance(progress, Progress) and luks_uuid and progress.luks_uuid != luks_uuid:
        progress = f"shrink progress is for LUKS volume {progress.luks_uuid}, not {luks_uuid}"
    if isinstance(progress, Progress) and device_uuid and progress.fs_uuid != str(device_uuid):
        progress = f"shrink progress is for file system {progress.fs_uuid}, not {device_uuid}"
    uuids: set[uuid_mod.UUID] = set()
    if device_uuid is not None:
        uuids.add(device_uuid)
    if isinstance(progress, Progress):
        uuids.add(uuid_mod.UUID(progress.fs_uuid))
    kind, why_undo, where = _inspect_area(area, progress, uuids)
    decision = decide(progress, kind)
    if decision.action is Action.NOTHING:
        return None
    with report.step("shrink-recovery") as s:
        lines = [decision.why]
        if decision.roll_back and where is not None:
            lines.append(_roll_back(where, device, log))
        if decision.action is Action.STOP or "e2undo refused" in lines[-1]:
            if decision.action is Action.STOP:
                lines.append(why_undo)
            area.close()
            s.detail = "; ".join(lines)
            raise OfflineShrinkError(
                f"a shrink of the encrypted file system was cut off inside resize2fs, and its "
                f"undo record cannot be used: {s.detail}",
                hint=f"nothing was changed; the undo area {area.describe()} and "
                f"{state_dir}/.pystate/shrink-progress are kept. If /state was not tampered "
                "with, a disk error is likely. To go on without the record: remove the "
                "progress file and reboot; e2fsck then checks the file system (what it cannot "
                "place goes to lost+found, or it stops for a person)",
            )
        if decision.action is Action.FSCK_ONLY:
            log.error(f"interrupted shrink: {'; '.join(lines)}")
            try:
                result = fsck.check(device, "ext4")
            except fsck.FsckError as err:
                raise OfflineShrinkError(
                    f"a shrink was cut off without a usable progress file, and e2fsck cannot "
                    f"repair the encrypted file system: {err}",
                    hint=f"run 'e2fsck -f {device}' from the emergency shell",
                ) from None
            lines.append(f"e2fsck -p: {result.verdict}")
            remove_request(state_dir)
            lines.append("shrink request removed")
        if decision.action is Action.GIVE_UP and isinstance(progress, Progress):
            remove_request(state_dir)
            image = state_dir / IMAGE
            write_progress(state_dir, _given_up(progress, os.stat(image).st_size))
            lines.append(
                f"shrink given up after {MAX_ATTEMPTS} attempts; the resize service may ask "
                "again once the image has changed size"
            )
        area.remove()
        if decision.action in (Action.CLEAN_UP, Action.FSCK_ONLY) and not isinstance(
            progress, Progress
        ):
            remove_progress(state_dir)
        s.detail = "; ".join(lines)
        (log.warning if decision.action is not Action.CONTINUE else log.notice)(s.detail)
        return s.detail
