"""The initrd program: a straight pipeline of named, timed steps.

``pipeline()`` reads as the list of steps: configuration → find the state partition →
check it → mount it → grow it (GPT bit 59) → the encrypted area (provision or unlock,
encrypted.py) → plan the mounts → apply them; each step is a function of its own.
Each step logs one line with its duration to /dev/kmsg; the whole run is
summarized in /run/pystate/boot.json. Any failure stops here with one clear
line on the console; the unit's OnFailure (or dracut's die) takes the boot to
the emergency target. Nothing is written to the state partition but mounts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pystate_initrd.config import Config, load_config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import plan
from pystate_initrd.formats.superblock import FsInfo
from pystate_initrd.initrd import discover, encrypted, mounts, state_tree
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.system import block, fsck, growfs, mount_api

DEFAULT_CONFIG = Path("/etc/pystate/pystate.conf")
RUN_DIR = Path("/run/pystate")


class BootError(PystateError):
    """A boot step failed in a way its own module does not describe."""


@dataclass(frozen=True)
class BootPaths:
    sysroot: Path = Path("/sysroot")
    config: Path = DEFAULT_CONFIG
    cmdline: Path = Path("/proc/cmdline")
    run_dir: Path = RUN_DIR
    log: Path = Path("/dev/kmsg")
    efivars: Path = Path("/sys/firmware/efi/efivars")
    # Present when systemd is PID 1: the initrd may have run systemd-repart (discover's
    # message when the disk has no state partition); absent in dracut's shell initrd.
    systemd_dir: Path = Path(discover.SYSTEMD_RUNTIME_DIR)


def _state_mountpoint(paths: BootPaths) -> Path:
    """/sysroot/state when the image has that directory, else the /run fallback (SPEC §2)."""
    in_image = paths.sysroot / "state"
    if in_image.is_dir() and not in_image.is_symlink():
        return in_image
    fallback = paths.run_dir / "state"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def publish_config(paths: BootPaths, log: Log) -> None:
    """Copy the initrd's configuration to /run/pystate/pystate.conf for the booted system.

    The trusted configuration is the one in the initrd (SPEC §9); the booted system's resize
    service reads this copy (/run survives switch-root) rather than an /etc that may come
    from the state partition. No file in the initrd: a copy saying so, so that the booted
    system too uses the built-in defaults. Failing to write is logged, never fatal.
    """
    try:
        text = paths.config.read_bytes()
    except FileNotFoundError:
        text = f"# no {paths.config} in the initrd: built-in defaults\n".encode()
    except OSError as exc:
        log.warning(f"cannot read {paths.config}: {exc.strerror}")
        return
    target = paths.run_dir / "pystate.conf"
    try:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".pystate.conf.tmp")
        tmp.write_bytes(text)
        tmp.chmod(0o644)
        tmp.replace(target)
    except OSError as exc:
        log.warning(f"cannot publish the configuration as {target}: {exc.strerror}")


@dataclass
class Boot:
    """What the steps of one boot hand on to each other, filled in as they run."""

    paths: BootPaths
    cmdline: str
    log: Log
    report: BootReport
    cfg: Config = field(default_factory=Config)
    choice: discover.StateChoice | None = None
    fs: FsInfo | None = None
    state_dir: Path | None = None
    encrypted_dir: Path | None = None
    mount_plan: plan.MountPlan | None = None

    @property
    def read_only(self) -> bool:
        return bool(self.choice and self.choice.read_only)


def load_configuration(b: Boot) -> bool:
    """The trusted configuration (SPEC §9), published for the booted system; False: pystate=0."""
    with b.report.step("config") as s:
        config = b.paths.config if b.paths.config.exists() else None
        b.cfg = load_config(config, b.cmdline)
        b.log.debug_enabled = b.cfg.debug
        for warning in b.cfg.warnings:
            b.log.warning(warning)
        s.detail = "disabled by pystate=0" if not b.cfg.enabled else ""
        publish_config(b.paths, b.log)
    return b.cfg.enabled


def find_state_partition(b: Boot) -> None:
    with b.report.step("discover") as s:
        b.choice = discover.discover_state(
            b.cfg.state_device,
            sysroot=b.paths.sysroot,
            efivars=b.paths.efivars,
            initrd=discover.initrd_kind(b.paths.systemd_dir),
        )
        s.detail = f"{b.choice.device} (PARTUUID {b.choice.part_uuid}, {b.choice.reason})"
        b.report.facts["partition"] = b.choice.to_json()
    with b.report.step("probe") as s:
        b.fs = block.probe(b.choice.device)
        s.detail = f"{b.fs.fstype} {b.fs.uuid}"


def check_state_fs(b: Boot) -> None:
    """fsck -p semantics before mounting (SPEC §2), unless read-only or turned off."""
    assert b.choice is not None and b.fs is not None
    with b.report.step("fsck") as s:
        if b.read_only:
            s.detail = "skipped: partition is read-only (GPT bit 60)"
        elif not b.cfg.check_outer_fs:
            s.detail = "skipped: [state] check-fs = no"
        else:
            s.detail = str(fsck.check(b.choice.device, b.fs.fstype).verdict)


def mount_state(b: Boot) -> None:
    assert b.choice is not None and b.fs is not None
    device, fstype = b.choice.device, b.fs.fstype
    with b.report.step("mount-state") as s:
        target = _state_mountpoint(b.paths)
        # The outer file system is writable by anyone holding the disk, so nothing on
        # it may be a set-uid program or a device node; plain entries inherit this.
        flags = mount_api.MS_NOSUID | mount_api.MS_NODEV
        if b.read_only:
            flags |= mount_api.MS_RDONLY
        try:
            mount_api.mount(device, str(target), fstype, flags, None)
        except OSError as exc:
            raise BootError(
                f"mounting the state partition {device} ({fstype}) on {target} "
                f"failed: {exc.strerror}",
                hint=f"check it with 'fsck.{fstype} -f {device}' from the emergency shell",
            ) from None
        b.state_dir = target
        s.detail = f"{device} on {target} ({'ro' if b.read_only else 'rw'})"
        b.report.facts["state"] = {
            "device": device,
            "fstype": fstype,
            "uuid": str(b.fs.uuid),
            "mountpoint": str(target),
            "read_only": b.read_only,
        }


def grow_state_fs(b: Boot) -> None:
    """GPT bit 59: grow the outer file system to fill its partition."""
    assert b.choice is not None and b.fs is not None and b.state_dir is not None
    if not b.choice.grow_fs or b.read_only:
        return
    with b.report.step("grow-state-fs") as s:
        s.detail = growfs.grow(b.choice.device, b.fs.fstype, b.state_dir)


def open_encrypted_area(b: Boot) -> None:
    """Factory-reset if requested, then provision or unlock encrypted.img (its own steps:
    encrypted.py, factory_reset.py)."""
    assert b.state_dir is not None
    b.encrypted_dir = encrypted.setup(
        b.cfg,
        b.state_dir,
        b.paths.sysroot,
        b.report,
        b.cmdline,
        read_only=b.read_only,
        efivars_dir=b.paths.efivars,
    )


def plan_mounts(b: Boot) -> None:
    with b.report.step("plan") as s:
        b.mount_plan = state_tree.build_plan(
            b.state_dir,
            b.encrypted_dir,
            plain_allowlist=b.cfg.plain_allowlist,
            modes={t: plan.MountMode(m) for t, m in b.cfg.mount_modes.items()},
        )
        for r in b.mount_plan.rejected:
            b.log.warning(f"rejected {r.area} entry {r.name!r}: {r.reason}")
        s.detail = f"{len(b.mount_plan.mounts)} mounts, {len(b.mount_plan.rejected)} rejected"
        b.report.facts.update(b.mount_plan.to_json())


def apply_mounts(b: Boot) -> None:
    assert b.state_dir is not None and b.mount_plan is not None
    with b.report.step("mounts") as s:
        area_dirs = {"plain": b.state_dir}
        if b.encrypted_dir is not None:
            area_dirs["encrypted"] = b.encrypted_dir
        done = mounts.apply_plan(b.mount_plan.mounts, sysroot=b.paths.sysroot, area_dirs=area_dirs)
        for d in done:
            b.log.info(f"mounted {d.mount.area} {d.mount.name} on {d.mount.target}")
        s.detail = ", ".join(d.mount.target for d in done) or "nothing to mount"


def pipeline(b: Boot) -> str:
    """The steps of the boot, in order; the outcome."""
    if not load_configuration(b):
        return "disabled"
    find_state_partition(b)
    check_state_fs(b)
    mount_state(b)
    grow_state_fs(b)
    open_encrypted_area(b)
    plan_mounts(b)
    apply_mounts(b)
    return "ok"


def run_boot(paths: BootPaths) -> int:
    """Run the pipeline; 0 when it finished or is disabled, 1 when it stopped."""
    cmdline = paths.cmdline.read_text(errors="replace")
    # Debugging is off until the configuration says otherwise: pystate.debug is read by
    # config.py like every other word (pystate.debug=0 is off), and nowhere else.
    log = Log(kmsg_path=str(paths.log)).install()
    report = BootReport(log)
    try:
        report.outcome = pipeline(Boot(paths, cmdline, log, report))
        return 0
    except PystateError as exc:
        report.outcome = "failed"
        report.error = str(exc)
        log.error(f"boot stopped: {exc}")
        return 1
    except OSError as exc:
        # Not explained by a step: still one line naming the file, and the boot stops.
        where = f"{exc.filename}: " if exc.filename else ""
        report.outcome = "failed"
        report.error = f"{where}{exc.strerror or exc}"
        log.error(f"boot stopped: {report.error}")
        return 1
    except Exception as exc:
        # A bug, not bad input: still one line for the console; the traceback in debug mode.
        report.outcome = "failed"
        report.error = f"internal error: {type(exc).__name__}: {exc}"
        log.error(f"boot stopped: {report.error} (boot with pystate.debug for details)")
        if log.debug_enabled:
            import traceback

            log.debug(traceback.format_exc())
        return 1
    finally:
        try:
            report.write(paths.run_dir / "boot.json")
        except OSError as exc:
            log.error(f"cannot write {paths.run_dir / 'boot.json'}: {exc.strerror}")
        log.info(f"finished ({report.outcome}) in {report.total_ms():.1f} ms")
        log.close()
        if os.environ.get("PYSTATE_PRINT_REPORT"):
            print((paths.run_dir / "boot.json").read_text(), end="")
