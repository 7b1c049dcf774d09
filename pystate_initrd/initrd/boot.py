"""The initrd program: a straight pipeline of named, timed steps.

config → discover → fsck → mount-state → encrypted area (provision or unlock, see
encrypted.py) → plan → mounts → report.
Each step logs one line with its duration to /dev/kmsg; the whole run is
summarized in /run/pystate/boot.json. Any failure stops here with one clear
line on the console; the unit's OnFailure (or dracut's die) takes the boot to
the emergency target. Nothing is written to the state partition but mounts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport

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


def run_boot(paths: BootPaths) -> int:
    from pystate_initrd import config as config_mod
    from pystate_initrd.formats import plan
    from pystate_initrd.initrd import discover, mounts, state_tree
    from pystate_initrd.system import block, fsck, mount_api

    cmdline = paths.cmdline.read_text(errors="replace")
    # Debugging is off until the configuration says otherwise: pystate.debug is read by
    # config.py like every other word (pystate.debug=0 is off), and nowhere else.
    log = Log(kmsg_path=str(paths.log)).install()
    report = BootReport(log)
    try:
        with report.step("config") as s:
            cfg = config_mod.load_config(paths.config if paths.config.exists() else None, cmdline)
            log.debug_enabled = cfg.debug
            for warning in cfg.warnings:
                log.warning(warning)
            s.detail = "disabled by pystate=0" if not cfg.enabled else ""
            publish_config(paths, log)
        if not cfg.enabled:
            report.outcome = "disabled"
            return 0

        with report.step("discover") as s:
            choice = discover.discover_state(cfg.state_device, sysroot=paths.sysroot)
            s.detail = f"{choice.device} (PARTUUID {choice.part_uuid}, {choice.reason})"
            report.facts["partition"] = choice.to_json()
        with report.step("probe") as s:
            fs = block.probe(choice.device)
            s.detail = f"{fs.fstype} {fs.uuid}"

        read_only = choice.read_only
        with report.step("fsck") as s:
            if read_only:
                s.detail = "skipped: partition is read-only (GPT bit 60)"
            elif not cfg.check_outer_fs:
                s.detail = "skipped: [state] check-fs = no"
            else:
                result = fsck.check(choice.device, fs.fstype)
                s.detail = str(result.verdict)

        with report.step("mount-state") as s:
            target = _state_mountpoint(paths)
            # The outer file system is writable by anyone holding the disk, so nothing on
            # it may be a set-uid program or a device node; plain entries inherit this.
            flags = mount_api.MS_NOSUID | mount_api.MS_NODEV
            if read_only:
                flags |= mount_api.MS_RDONLY
            try:
                mount_api.mount(choice.device, str(target), fs.fstype, flags, None)
            except OSError as exc:
                raise BootError(
                    f"mounting the state partition {choice.device} ({fs.fstype}) on {target} "
                    f"failed: {exc.strerror}",
                    hint=f"check it with 'fsck.{fs.fstype} -f {choice.device}' "
                    "from the emergency shell",
                ) from None
            s.detail = f"{choice.device} on {target} ({'ro' if read_only else 'rw'})"
            report.facts["state"] = {
                "device": choice.device,
                "fstype": fs.fstype,
                "uuid": str(fs.uuid),
                "mountpoint": str(target),
                "read_only": read_only,
            }

        if choice.grow_fs and not read_only:
            with report.step("grow-state-fs") as s:
                from pystate_initrd.system.growfs import grow

                s.detail = grow(choice.device, fs.fstype, target)

        from pystate_initrd.initrd import encrypted

        encrypted_dir = encrypted.setup(
            cfg, target, paths.sysroot, report, cmdline, read_only=read_only
        )

        with report.step("plan") as s:
            mount_plan = state_tree.build_plan(
                target,
                encrypted_dir,
                plain_allowlist=cfg.plain_allowlist,
                modes={t: plan.MountMode(m) for t, m in cfg.mount_modes.items()},
            )
            for rejection in mount_plan.rejected:
                log.warning(
                    f"rejected {rejection.area} entry {rejection.name!r}: {rejection.reason}"
                )
            s.detail = f"{len(mount_plan.mounts)} mounts, {len(mount_plan.rejected)} rejected"
            report.facts.update(mount_plan.to_json())

        with report.step("mounts") as s:
            area_dirs = {"plain": target}
            if encrypted_dir is not None:
                area_dirs["encrypted"] = encrypted_dir
            done = mounts.apply_plan(mount_plan.mounts, sysroot=paths.sysroot, area_dirs=area_dirs)
            for d in done:
                log.info(f"mounted {d.mount.area} {d.mount.name} on {d.mount.target}")
            s.detail = ", ".join(d.mount.target for d in done) or "nothing to mount"
        report.outcome = "ok"
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
