"""`build.py testroot` and `build.py debian-root`: the root file systems the QEMU tests boot.

testroot: Debian's static busybox and a shell PID 1 that prints /proc/mounts, lists the
paths it was asked to (``--list`` at build time, ``testroot.list=`` on the kernel
command line), prints ``PYSTATE-TESTROOT-OK`` and powers off. Seconds to build and to boot.

debian-root: a real Debian (mmdebstrap minbase + systemd, udev, python3-minimal,
cryptsetup-bin) that boots read-only to its default target, where ``pystate-report.service``
prints findmnt and ``PYSTATE-DEBIAN-OK`` to the console and powers off. The bootstrap is
cached as a tarball in ``cache/``; the apt sources are this machine's configured Debian mirror.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import run

from . import CACHE

TESTROOT_MARKER = "PYSTATE-TESTROOT-OK"
DEBIAN_MARKER = "PYSTATE-DEBIAN-OK"
MOUNTS_BEGIN = "PYSTATE-MOUNTS-BEGIN"
MOUNTS_END = "PYSTATE-MOUNTS-END"
LIST_PREFIX = "PYSTATE-LIST "
FILE_PREFIX = "PYSTATE-FILE "
BOOT_JSON_PREFIX = "PYSTATE-BOOT-JSON "

BUSYBOX = Path("/bin/busybox")
# Mount points a pystate root needs (targets of state entries) plus what switch_root moves.
ROOT_DIRS = ("proc", "sys", "dev", "run", "tmp", "etc", "home", "var", "state", "srv", "opt", "usr")

DEBIAN_SUITE = "bookworm"
# cryptsetup-bin: `cryptsetup resize` for the booted resize service (booted.py);
# tpm2-tools and its device TCTI (the package's Recommends, which apt installs by default):
# `pystate status` reads the PCRs to say whether the next boot unseals.
DEBIAN_PACKAGES = (
    "systemd", "udev", "python3-minimal", "cryptsetup-bin", "tpm2-tools", "libtss2-tcti-device0",
)  # fmt: skip


class RootError(PystateError):
    """A test root could not be built."""


# --- the minimal busybox root ---------

# PID 1 of the test root. Lines the tests parse:
#   PYSTATE-CMDLINE <the kernel command line>
#   PYSTATE-SECUREBOOT 1|0|none                              (the firmware's SecureBoot variable)
#   PYSTATE-PCR7 <hex>                                       (the TPM's sha256 PCR 7, if any)
#   PYSTATE-MOUNTS-BEGIN / <each line of /proc/mounts> / PYSTATE-MOUNTS-END
#   PYSTATE-LIST <path> <octal mode> <uid>:<gid> <type>     (every entry below each listed path)
#   PYSTATE-FILE <path>: <first line>                        (regular files below listed paths)
#   PYSTATE-BOOT-JSON <boot.json on one line>               (when /run/pystate/boot.json exists)
#   PYSTATE-TESTROOT-OK
# testroot.write=PATH:TEXT on the kernel command line appends TEXT (no spaces) as a line to
# PATH before the report (PYSTATE-WROTE PATH), so a later boot can look for it; first it
# prints how many lines PATH had (PYSTATE-LINES PATH N): what earlier boots kept.
# testroot.run=FILE: when FILE exists (a UKI's command line is fixed, so a test puts it on the
# state partition between boots), runs its one line as a command, prints the output prefixed
# PYSTATE-RUN-OUT, then PYSTATE-RUN <exit status>, and deletes FILE.
# Both test roots' inits print the firmware's Secure Boot state and PCR 7 (sh, busybox or not).
FIRMWARE_REPORT = r"""sb=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
if [ -r "$sb" ]; then
	echo "PYSTATE-SECUREBOOT $(tail -c 1 "$sb" | od -An -tu1 | tr -d ' ')"
else
	echo "PYSTATE-SECUREBOOT none"
fi
pcr7=/sys/class/tpm/tpm0/pcr-sha256/7
[ -r "$pcr7" ] && echo "PYSTATE-PCR7 $(cat "$pcr7")"
"""

TESTROOT_INIT = (
    r"""#!/bin/busybox sh
# PID 1 of pystate's minimal test root (build.py testroot): report, then power off.
export PATH=/bin:/sbin
[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys
echo "PYSTATE-CMDLINE $(cat /proc/cmdline)"
"""
    + FIRMWARE_REPORT
    + r"""echo "PYSTATE-MOUNTS-BEGIN"
cat /proc/mounts
echo "PYSTATE-MOUNTS-END"
list=""
[ -r /etc/testroot.list ] && list="$(cat /etc/testroot.list)"
for word in $(cat /proc/cmdline); do
	case "$word" in
	testroot.list=*) list="$list $(echo "${word#*=}" | tr , ' ')" ;;
	testroot.write=*)
		spec="${word#*=}"
		# the lines earlier boots appended: what a reboot kept
		echo "PYSTATE-LINES ${spec%%:*} $(cat "${spec%%:*}" 2>/dev/null | wc -l)"
		echo "${spec#*:}" >>"${spec%%:*}" && sync && echo "PYSTATE-WROTE ${spec%%:*}"
		;;
	testroot.run=*)
		run="${word#*=}"
		if [ -r "$run" ]; then
			sh "$run" >/run/testroot.run 2>&1
			rc=$?
			sed 's/^/PYSTATE-RUN-OUT /' /run/testroot.run
			echo "PYSTATE-RUN $rc"
			rm -f "$run"
			sync
		fi
		;;
	esac
done
# pystate's boot report, on one line so kernel messages cannot split it
[ -r /run/pystate/boot.json ] && echo "PYSTATE-BOOT-JSON $(tr -d '\n' </run/pystate/boot.json)"
for top in $list; do
	if [ ! -e "$top" ] && [ ! -L "$top" ]; then
		echo "PYSTATE-LIST $top missing"
		continue
	fi
	find "$top" | sort | while read -r path; do
		echo "PYSTATE-LIST $(stat -c '%n %a %u:%g %F' "$path")"
		if [ -f "$path" ] && [ ! -L "$path" ]; then
			echo "PYSTATE-FILE $path: $(head -n 1 "$path" 2>&1 | head -c 200)"
		fi
	done
done
echo "PYSTATE-TESTROOT-OK"
sync
poweroff -f
"""
)


def build_testroot(dest: Path | str, *, lists: Sequence[str] = ()) -> Path:
    """The minimal busybox root in ``dest`` (replaced); ``lists`` are paths its init lists."""
    dest = Path(dest)
    if not BUSYBOX.is_file():
        raise RootError(f"{BUSYBOX} not found", hint="apt-get install busybox-static")
    if dest.exists():
        shutil.rmtree(dest)
    for d in (*ROOT_DIRS, "bin", "sbin"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    applets = run([str(BUSYBOX), "--list"]).stdout.decode().split()
    for applet in applets:
        if applet != "busybox" and not (dest / "bin" / applet).exists():
            (dest / "bin" / applet).symlink_to("busybox")
    init = dest / "sbin/init"
    init.write_text(TESTROOT_INIT)
    init.chmod(0o755)
    (dest / "etc/hostname").write_text("pystate-testroot\n")
    # systemd's switch-root refuses a new root that is not an OS tree (no os-release).
    (dest / "etc/os-release").write_text('ID=pystate-testroot\nNAME="pystate test root"\n')
    (dest / "etc/testroot.list").write_text("".join(f"{p}\n" for p in lists))
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    return dest


def console_value(console: str, key: str) -> str | None:
    """The rest of the first ``PYSTATE-<key> …`` line of a test root's console."""
    prefix = f"PYSTATE-{key} "
    for line in console.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def lines_kept(console: str, path: str) -> int | None:
    """N of ``PYSTATE-LINES path N``: the lines earlier boots appended to path."""
    value = console_value(console, f"LINES {path}")
    return int(value) if value is not None else None


def parse_report(
    console: str,
) -> tuple[list[list[str]], dict[str, tuple[str, str, str]], dict[str, str]]:
    """From a test root's console: the /proc/mounts rows, the listed entries (path -> (mode,
    owner, type)) and the first lines of listed files (path -> text)."""
    mounts: list[list[str]] = []
    listed: dict[str, tuple[str, str, str]] = {}
    files: dict[str, str] = {}
    inside = False
    for raw in console.splitlines():
        line = re.sub(r"^\[\s*\d+\.\d+\]\s*", "", raw)  # kernel messages may interleave
        if line.endswith(MOUNTS_BEGIN):  # a getty's "login: " prompt may come first
            inside = True
        elif line == MOUNTS_END:
            inside = False
        elif inside:
            mounts.append(line.split())
        elif line.startswith(LIST_PREFIX):
            fields = line[len(LIST_PREFIX) :].split(" ", 3)
            if len(fields) == 4:
                listed[fields[0]] = (fields[1], fields[2], fields[3])
            elif len(fields) == 2:
                listed[fields[0]] = ("", "", fields[1])
        elif line.startswith(FILE_PREFIX):
            path, _, text = line[len(FILE_PREFIX) :].partition(": ")
            files[path] = text
    return mounts, listed, files


def boot_json(console: str) -> dict[str, object] | None:
    """The boot.json a root printed on its PYSTATE-BOOT-JSON line, or None."""
    for line in console.splitlines():
        if line.startswith(BOOT_JSON_PREFIX):
            try:
                data = json.loads(line[len(BOOT_JSON_PREFIX) :])
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None


# --- the Debian root ---------


def deb822_fields(stanza: str) -> dict[str, str]:
    """The fields of one deb822 stanza (an apt .sources entry), keys lowercased."""
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


def debian_sources(suite: str = DEBIAN_SUITE) -> list[str]:
    """sources.list lines for ``suite`` (and its -updates, -security) from this machine's apt
    configuration (one-line and deb822 formats); no host name is built in."""
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    files += sorted(d.glob("*.list")) + sorted(d.glob("*.sources")) if d.is_dir() else []
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    lines: list[str] = []
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = deb822_fields(stanza)
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    for s in fields.get("suites", "").split():
                        if s in wanted:
                            lines.append(f"deb {uri} {s} {fields.get('components', 'main')}")
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    rest = [w for w in words[1:] if not w.startswith("[")]
                    if len(rest) >= 2 and rest[1] in wanted:
                        lines.append(" ".join(["deb", *rest]))
    if not lines:
        raise RootError(
            f"no Debian {suite} mirror configured in /etc/apt/sources.list(.d)",
            hint=f"add a 'deb <mirror> {suite} main' line",
        )
    return lines


def debian_tarball(*, refresh: bool = False) -> Path:
    """The mmdebstrap tarball, cached in cache/ per suite and package set."""
    sources = debian_sources()
    key = hashlib.sha256("\n".join([DEBIAN_SUITE, *DEBIAN_PACKAGES, *sources]).encode())
    tarball = CACHE / f"debian-{DEBIAN_SUITE}-{key.hexdigest()[:12]}.tar"
    if tarball.is_file() and not refresh:
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_suffix(".tmp.tar")
    argv = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        f"--include={','.join(DEBIAN_PACKAGES)}",
        "--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        DEBIAN_SUITE,
        str(tmp),
        *sources,
    ]
    run(argv, env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
    tmp.rename(tarball)
    return tarball


REPORT_SERVICE = """\
[Unit]
Description=pystate test report: mounts to the console, then power off
After=multi-user.target
Wants=multi-user.target

[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
ExecStart=/usr/local/sbin/pystate-report
ExecStartPost=/usr/bin/systemctl --no-block poweroff
"""

REPORT_SCRIPT = (
    """\
#!/bin/sh
# Prints what the tests look for, then the unit powers the machine off.
echo "PYSTATE-CMDLINE $(cat /proc/cmdline)"
"""
    + FIRMWARE_REPORT
    + """echo "PYSTATE-MOUNTS-BEGIN"
cat /proc/mounts
echo "PYSTATE-MOUNTS-END"
target="$(systemctl get-default)"
echo "PYSTATE-DEBIAN-TARGET $target $(systemctl is-active "$target")"
# pystate's boot report, on one line so kernel messages cannot split it
[ -r /run/pystate/boot.json ] && echo "PYSTATE-BOOT-JSON $(tr -d '\n' < /run/pystate/boot.json)"
for path in $(cat /etc/testroot.list 2>/dev/null); do
	[ -e "$path" ] || { echo "PYSTATE-LIST $path missing"; continue; }
	find "$path" | sort | while read -r p; do
		echo "PYSTATE-LIST $(stat -c '%n %a %u:%g %F' "$p")"
	done
done
echo "PYSTATE-DEBIAN-OK"
"""
)


def _extract(tarball: Path, dest: Path) -> None:
    # tar keeps owners, modes, device nodes and xattrs exactly as mmdebstrap made them
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(tarball),
         "-C", str(dest)])  # fmt: skip


def build_debian_root(
    dest: Path | str, *, lists: Sequence[str] = (), refresh: bool = False
) -> Path:
    """A read-only-bootable Debian root in ``dest`` (replaced) from the cached tarball."""
    dest = Path(dest)
    tarball = debian_tarball(refresh=refresh)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    _extract(tarball, dest)
    configure_debian_root(dest, lists=lists)
    return dest


def configure_debian_root(root: Path, *, lists: Iterable[str] = ()) -> None:
    """Make an extracted Debian tree boot read-only and report on the console."""
    etc = root / "etc"
    # minbase has systemd but not systemd-sysv, which would provide /sbin/init
    init = root / "usr/sbin/init" if (root / "sbin").is_symlink() else root / "sbin/init"
    if not init.exists() and not init.is_symlink():
        init.symlink_to("/lib/systemd/systemd")
    # An empty machine-id on a read-only root: systemd mounts a transient one over it (and
    # does not run first-boot setup, which needs a writable /etc).
    (etc / "machine-id").write_text("")
    (root / "var/lib/dbus").mkdir(parents=True, exist_ok=True)
    (etc / "hostname").write_text("pystate-debian\n")
    (etc / "fstab").write_text("# read-only root; pystate provides the state mounts\n")
    for d in ("home", "var", "etc", "state", "srv", "opt", "usr/local"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # root without a password on the console, so a failed test can be debugged by hand
    shadow = etc / "shadow"
    if shadow.is_file():
        shadow.write_text(re.sub(r"^root:[^:]*:", "root::", shadow.read_text(), flags=re.M))
    units = etc / "systemd/system"
    (units / "pystate-report.service").write_text(REPORT_SERVICE)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "pystate-report.service"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/systemd/system/pystate-report.service")
    default = units / "default.target"
    default.unlink(missing_ok=True)
    default.symlink_to("/lib/systemd/system/multi-user.target")
    # Units that want a writable root or a network and only slow a test boot down.
    for unit in ("systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                 "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer",
                 "systemd-networkd.service"):  # fmt: skip
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    script = root / "usr/local/sbin/pystate-report"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(REPORT_SCRIPT)
    script.chmod(0o755)
    (etc / "testroot.list").write_text("".join(f"{p}\n" for p in lists))


# --- commands ---------


def _cmd_testroot(args: argparse.Namespace) -> int:
    print(build_testroot(args.dir, lists=args.list))
    return 0


def _cmd_debian(args: argparse.Namespace) -> int:
    print(build_debian_root(args.dir, lists=args.list, refresh=args.refresh))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "testroot", help="a minimal busybox root whose init reports its mounts and powers off"
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="destination (replaced)")
    p.add_argument("--list", action="append", default=[], metavar="PATH", help="list PATH at boot")
    p.set_defaults(func=_cmd_testroot)
    p = subparsers.add_parser(
        "debian-root", help="a Debian root (mmdebstrap, cached) that boots read-only and reports"
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="destination (replaced)")
    p.add_argument("--list", action="append", default=[], metavar="PATH", help="list PATH at boot")
    p.add_argument("--refresh", action="store_true", help="bootstrap again, ignoring the cache")
    p.set_defaults(func=_cmd_debian)
