"""The rows ``build.py bench-unlock`` holds pystate against: what a distributor would build
instead with dracut's own modules (issue 13; docs/performance.md).

B, the systemd way: the same dracut base plus ``crypt`` and ``tpm2-tss``; the same kind of
LUKS2 image file (luks.format's parameters: aes-xts-plain64, 4096-byte sectors, PBKDF2 at
its minimum) on the same kind of state partition, enrolled by ``systemd-cryptenroll
--tpm2-device=auto --tpm2-pcrs=7`` and attached by systemd-cryptsetup from the initrd's
``/etc/crypttab`` (libcryptsetup sets up the loop device for the file itself); the state
partition, the inner file system and the bind mounts of pystate's default layout (/etc and
/var from the image, /home plain) come from the initrd's ``/etc/fstab``, each with a
``systemd-fsck`` like pystate's checks.

Both A (pystate) and B carry the same two bench-only pieces, which the production initrds
lack: ``bench-report.service`` (after initrd-switch-root.target is reached) writes the
monotonic timestamps systemd kept for the units that matter to /run/bench/report.txt, which
the test root prints (``testroot.run=/run/bench/print.sh``); a drop-in reads the memory peak
of the unlocking service's cgroup (``memory.peak``) when its main process has exited.

B's first boot uses B0, the B initrd plus ``bench-provision.service``: before
systemd-cryptsetup runs, it opens the image with the passphrase, makes the inner ext4, seeds
/etc and /var from the OS image and enrolls the TPM (PCR 7) with systemd-cryptenroll, in the
guest, so the policy holds that boot's PCR 7. B0 is never timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

B_NAME = "stateb"  # no '-': unit names stay unescaped (systemd-cryptsetup@stateb.service)
B_UNIT = f"systemd-cryptsetup@{B_NAME}.service"
C_NAME = "statec"
C_UNIT = f"systemd-cryptsetup@{C_NAME}.service"
C_ASKPASS = "clevis-luks-askpass.service"
C_LOOP = "/dev/loop7"
C_LOOP_UNIT = f"""[Unit]
Description=bench-unlock C: the image file on a loop device, for clevis
DefaultDependencies=no
RequiresMountsFor=/state
Before={C_UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=losetup --direct-io=on {C_LOOP} /state/encrypted.img
"""
B_PASSPHRASE = "bench-unlock provisioning passphrase"
A_UNIT = "pystate.service"
SWITCH_ROOT = "initrd-switch-root.target"
REPORT_UNITS = (A_UNIT, B_UNIT, C_UNIT, C_ASKPASS, SWITCH_ROOT, "sysroot.mount")
PRINT_SCRIPT = "/run/bench/print.sh"
UNIT_PREFIX = "BENCH-UNIT "
PEAK_PREFIX = "BENCH-PEAK "
FAILED_PREFIX = "BENCH-FAILED "
PROVISIONED = "BENCH-PROVISIONED"
B_IMAGE_SIZE = 256 * 1024 * 1024  # pystate's default min-size, sparse as pystate's

_REPORT_SH = f"""#!/bin/bash
# bench-unlock: the monotonic timestamps (µs since the kernel started) systemd kept
out=/run/bench
mkdir -p "$out"
for u in {" ".join(REPORT_UNITS)}; do
\tprintf '{UNIT_PREFIX}%s ' "$u"
\tsystemctl show -p ExecMainStartTimestampMonotonic -p ExecMainExitTimestampMonotonic \\
\t\t-p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic "$u" |
\t\ttr '\\n' ' '
\techo
done >"$out/report.txt"
cat /run/bench-peak-* >>"$out/report.txt" 2>/dev/null
# clevis-luks-askpass (Type=simple, looping) is still running: its cgroup's peak so far
cg=/sys/fs/cgroup/system.slice/{C_ASKPASS}
[ -r "$cg/memory.peak" ] &&
	echo "{PEAK_PREFIX}{C_ASKPASS[:-8]} $(cat "$cg/memory.peak") 0" >>"$out/report.txt"
# what a failed row needs explained: failed units, the new root's mounts
for unit in $(systemctl list-units --failed --no-legend --plain | cut -d' ' -f1); do
	echo "{FAILED_PREFIX}$unit" >>"$out/report.txt"
	journalctl -b -u "$unit" -o cat --no-pager | tail -n 8 |
		sed 's/^/BENCH-LOG /' >>"$out/report.txt"
done
for u in state.mount run-{B_NAME}.mount sysroot-etc.mount sysroot-var.mount \\
	dev-mapper-{B_NAME}.device; do
	printf 'BENCH-STATE %s ' "$u" >>"$out/report.txt"
	systemctl show -p ActiveState -p Result -p ActiveEnterTimestampMonotonic \\
		-p InactiveEnterTimestampMonotonic "$u" | tr '\\n' ' ' >>"$out/report.txt"
	echo >>"$out/report.txt"
done
findmnt -rn -o TARGET,SOURCE | grep '^/sysroot' | sed 's/^/BENCH-MOUNT /' >>"$out/report.txt"
echo "cat $out/report.txt" >{PRINT_SCRIPT}
"""

# Builtins only (no fork): the PIDs allocated between the two scripts are the service's main
# process, its children and threads, plus whatever else the machine started meanwhile.
_PIDS_SH = """#!/bin/bash
# bench-unlock: the last PID allocated when the service's main process is about to start
read -r _ _ _ _ last </proc/loadavg
echo "$last" >"/run/bench-pid-$1"
"""

_PEAK_SH = f"""#!/bin/bash
# bench-unlock: the memory peak of this service's cgroup (its main process has exited) and
# the PIDs allocated since bench-pids.sh ran (this script's own excluded)
read -r _ _ _ _ last </proc/loadavg
read -r first <"/run/bench-pid-$1"
read -r cg </proc/self/cgroup
read -r peak <"/sys/fs/cgroup${{cg#0::}}/memory.peak"
echo "{PEAK_PREFIX}$1 $peak $((last - first - 1))" >"/run/bench-peak-$1"
"""

_REPORT_UNIT = f"""[Unit]
Description=bench-unlock report
DefaultDependencies=no
After={SWITCH_ROOT}
Before=initrd-switch-root.service

[Service]
Type=oneshot
ExecStart=/usr/lib/bench/report.sh
"""

_PEAK_DROPIN = """[Service]
MemoryAccounting=yes
ExecStartPre=/usr/lib/bench/pids.sh %N
ExecStartPost=/usr/lib/bench/peak.sh %N
"""

# Every fstab line is required by initrd-fs.target (as pystate.service is, through
# initrd-root-fs.target) rather than by local-fs.target, which the initrd reaches early.
_FSTAB_OPTS = "x-systemd.required-by=initrd-fs.target,x-systemd.before=initrd-fs.target"


def crypttab(name: str = B_NAME, *, provision: bool = False) -> str:
    if provision:
        # nofail: the unit is not ordered before cryptsetup.target, which the initrd reaches
        # before sysroot.mount: B0's provisioning (after sysroot.mount, before this unit)
        # would close an ordering cycle.
        return f"{name} /state/encrypted.img - tpm2-device=auto,headless=true,nofail\n"
    if name == C_NAME:
        # clevis answers systemd-cryptsetup's passphrase question (clevis-luks-askpass.path),
        # but only for a block device ([ -b "$d" ] in clevis 19's clevis-luks-askpass): the
        # image file gets a loop device first (C_LOOP_UNIT).
        return f"{name} {C_LOOP} none\n"
    # headless: a failed TPM unlock fails the unit instead of waiting for a passphrase.
    return f"{name} /state/encrypted.img - tpm2-device=auto,headless=true\n"


def fstab(name: str = B_NAME) -> str:
    inner = f"/run/{name}"
    needs_inner = f"bind,x-systemd.requires-mounts-for={inner},{_FSTAB_OPTS}"
    return "".join(
        (
            f"PARTLABEL=state /state ext4 defaults,{_FSTAB_OPTS} 0 2\n",
            f"/dev/mapper/{name} {inner} ext4 defaults,{_FSTAB_OPTS} 0 2\n",
            f"{inner}/etc /sysroot/etc none {needs_inner} 0 0\n",
            f"{inner}/var /sysroot/var none {needs_inner} 0 0\n",
            f"/state/home /sysroot/home none bind,x-systemd.requires-mounts-for=/state,"
            f"{_FSTAB_OPTS} 0 0\n",
        )
    )


_PROVISION_SH = f"""#!/bin/bash
# bench-unlock B0: what a distributor's installer does for the systemd way, in the guest
set -euo pipefail
printf %s '{B_PASSPHRASE}' | cryptsetup open --key-file=- /state/encrypted.img {B_NAME}-prov
mkfs.ext4 -q -L {B_NAME} -m 1 /dev/mapper/{B_NAME}-prov
mkdir -p /run/{B_NAME}-prov
mount /dev/mapper/{B_NAME}-prov /run/{B_NAME}-prov
cp -a /sysroot/etc /sysroot/var /run/{B_NAME}-prov/
umount /run/{B_NAME}-prov
cryptsetup close {B_NAME}-prov
PASSWORD='{B_PASSPHRASE}' systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=7 \\
\t/state/encrypted.img
sync
echo "{PROVISIONED}"  # to the console (StandardOutput=journal+console)
"""

_PROVISION_UNIT = f"""[Unit]
Description=bench-unlock: provision the systemd way's image
DefaultDependencies=no
RequiresMountsFor=/state /sysroot
Before={B_UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/bench/provision.sh
StandardOutput=journal+console
StandardError=journal+console
"""

# Programs B0 needs beyond the crypt module's (dracut --install).
C_PROGRAMS = ("losetup",)
PROVISION_PROGRAMS = ("cryptsetup", "systemd-cryptenroll", "mkfs.ext4", "cp", "sync")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _wants(tree: Path, target: str, unit: str) -> None:
    link = tree / "etc/systemd/system" / f"{target}.wants" / unit
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f"../{unit}")


def bench_tree(dest: Path, *, unit: str, more: tuple[str, ...] = (), environment: str = "") -> Path:
    """The bench-only files every row carries: the report unit, the peak drop-in on ``unit``
    (and on each of ``more``); ``environment``: NAME=VALUE for ``unit`` (a lever's row)."""
    units = dest / "etc/systemd/system"
    _write(dest / "usr/lib/bench/report.sh", _REPORT_SH, 0o755)
    _write(dest / "usr/lib/bench/peak.sh", _PEAK_SH, 0o755)
    _write(dest / "usr/lib/bench/pids.sh", _PIDS_SH, 0o755)
    _write(units / "bench-report.service", _REPORT_UNIT)
    _wants(dest, SWITCH_ROOT, "bench-report.service")
    for name in (unit, *more):
        _write(units / f"{name}.d/90-bench-peak.conf", _PEAK_DROPIN)
    if environment:
        _write(units / f"{unit}.d/91-bench-env.conf", f"[Service]\nEnvironment={environment}\n")
    return dest


def systemd_tree(dest: Path, *, provision: bool = False, name: str = B_NAME) -> Path:
    """B's (or C's) initrd additions: crypttab, fstab, the bench pieces (and B0's
    provisioning)."""
    if name == C_NAME:
        bench_tree(dest, unit=C_UNIT)
        _write(dest / "etc/systemd/system/bench-loop.service", C_LOOP_UNIT)
        askpass = dest / f"etc/systemd/system/{C_ASKPASS}.d/90-bench-memory.conf"
        _write(askpass, "[Service]\nMemoryAccounting=yes\n")
        _wants(dest, "cryptsetup.target", "bench-loop.service")
    else:
        bench_tree(dest, unit=B_UNIT)
    _write(dest / "etc/crypttab", crypttab(name, provision=provision))
    _write(dest / "etc/fstab", fstab(name))
    if provision:
        _write(dest / "usr/lib/bench/provision.sh", _PROVISION_SH, 0o755)
        _write(dest / "etc/systemd/system/bench-provision.service", _PROVISION_UNIT)
        _wants(dest, "initrd-fs.target", "bench-provision.service")
    return dest


# --- the console lines (pure) ---


@dataclass(frozen=True)
class UnitTimes:
    """Monotonic µs since the kernel started (0: systemd recorded none)."""

    main_start: int
    main_exit: int
    inactive_exit: int
    active_enter: int


_PROPS = {
    "ExecMainStartTimestampMonotonic": "main_start",
    "ExecMainExitTimestampMonotonic": "main_exit",
    "InactiveExitTimestampMonotonic": "inactive_exit",
    "ActiveEnterTimestampMonotonic": "active_enter",
}


@dataclass(frozen=True)
class Peak:
    """A service's cgroup memory peak (bytes) and the PIDs allocated while it ran."""

    memory: int
    pids: int


def parse_bench_lines(console: str) -> tuple[dict[str, UnitTimes], dict[str, Peak]]:
    """The units' timestamps and peaks a boot printed (peaks by unit name without suffix)."""
    units: dict[str, UnitTimes] = {}
    peaks: dict[str, Peak] = {}
    for raw in console.splitlines():
        line = raw.removeprefix("PYSTATE-RUN-OUT ").strip()
        if line.startswith(UNIT_PREFIX):
            name, *props = line[len(UNIT_PREFIX) :].split()
            values = dict.fromkeys(_PROPS.values(), 0)
            for prop in props:
                key, _, value = prop.partition("=")
                if key in _PROPS and value.isdigit():
                    values[_PROPS[key]] = int(value)
            units[name] = UnitTimes(**values)
        elif line.startswith(PEAK_PREFIX):
            fields = line[len(PEAK_PREFIX) :].split()
            if len(fields) == 3 and fields[1].isdigit() and fields[2].lstrip("-").isdigit():
                peaks[fields[0]] = Peak(int(fields[1]), int(fields[2]))
    return units, peaks
