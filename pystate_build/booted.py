"""pystate in the booted OS: what an image build installs for ``pystate-resized.service``.

``install_pystate(root)`` installs pystate's Debian package (``build.py deb``) into an OS
tree with the root's own dpkg, as an image build does: the payload in ``/usr/lib/pystate``
(the zipapp, its frozen stdlib and extension modules: the same bytes the initrd runs),
``/usr/bin/pystate`` a symlink to it, and the resize unit, enabled by the package's postinst
(deb-systemd-helper). The frozen program finds its stdlib beside the real file, so a root
whose python3 is python3-minimal (no json, no cffi) runs it: there the package's dependency
on the full python3.11 (lintian forbids one on python3.11-minimal) is ignored, and only that
one (docs/packaging.md).

``install_fill_demo(root)`` adds the demo's last act: a oneshot unit that, on a boot whose
command line carries ``pystate-demo.fill``, writes into /var (inside encrypted.img) until
the resize service has grown the image, then prints ``pystate status``
(``PYSTATE-DEMO-STATUS``), the service's log lines (``PYSTATE-DEMO-LOG``) and one
``PYSTATE-DEMO-GROW`` line: sizes before and after, what was written, how long it took.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import CommandError, run

UNIT = "pystate-resized.service"
FILL_UNIT = "pystate-demo-fill.service"
FILL_WORD = "pystate-demo.fill"
FILL_ON_UNLOCK = f"{FILL_WORD}=unlocked"  # fill only on a boot that unlocked, not provisioned
GROW_PREFIX = "PYSTATE-DEMO-GROW "
LOG_PREFIX = "PYSTATE-DEMO-LOG "
STATUS_PREFIX = "PYSTATE-DEMO-STATUS "


class BootedError(PystateError):
    """pystate could not be installed in an OS tree."""


def install_pystate(root: Path, package: Path | None = None) -> Path:
    """Install pystate's .deb into root with ``dpkg -i`` run in it (chroot); returns the .deb.

    ``package``: the .deb; a payload directory (``build.py payload``) to package; None: the
    package is built from this checkout."""
    from .deb import build_deb

    if package is None or package.is_dir():
        package = build_deb(root.parent / f"{root.name}.deb.d", payload=package)
    argv = ["dpkg", "--force-unsafe-io"]
    if not _installed(root, "python3.11") and _installed(root, "python3.11-minimal"):
        argv.append("--ignore-depends=python3.11")
    inside = Path("/tmp") / package.name
    shutil.copyfile(package, root / inside.relative_to("/"))
    try:
        run(["chroot", str(root), *argv, "--install", str(inside)])
    except CommandError as exc:
        raise BootedError(f"dpkg could not install {package.name} in {root}: {exc}") from None
    finally:
        (root / inside.relative_to("/")).unlink()
    return package


def _installed(root: Path, package: str) -> bool:
    proc = run(
        ["chroot", str(root), "dpkg-query", "-W", "-f=${db:Status-Abbrev}", package],
        check=False,
    )
    return proc.returncode == 0 and proc.stdout.decode().startswith("ii")


def _enable(root: Path, unit: str, path: str) -> None:
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit).unlink(missing_ok=True)
    (wants / unit).symlink_to(path)


FILL_SERVICE = f"""\
[Unit]
Description=pystate demo: fill /var until pystate-resized.service grows encrypted.img
ConditionKernelCommandLine={FILL_WORD}
After={UNIT}
Wants={UNIT}
Before=pystate-report.service

[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
ExecStart=/usr/local/sbin/pystate-demo-fill
TimeoutStartSec=600
"""

# POSIX sh with coreutils only: the demo root's python3 is the minimal one (no json).
FILL_SCRIPT = r"""#!/bin/sh
# Writes 16 MiB files (fsync'd) into /var/lib/pystate-demo until encrypted.img has grown
# and the file system in it is larger, then prints one line for build.py demo.
# With pystate-demo.fill=unlocked (the UEFI demo's UKI has it on every boot) a boot that
# provisioned the image skips: the grow is shown on the boot that unlocks it.
if grep -qw 'pystate-demo.fill=unlocked' /proc/cmdline \
	&& grep -q '"unlocked_by": "provisioned"' /run/pystate/boot.json 2>/dev/null; then
	echo "PYSTATE-DEMO-SKIP this boot provisioned the image"
	exit 0
fi
img=/state/encrypted.img
[ -e "$img" ] || img=/run/pystate/state/encrypted.img
dir=/var/lib/pystate-demo
mkdir -p "$dir"
# One field of df for /var in bytes: size or avail.
var_df() { df -B1 --output="$1" /var | tail -n 1 | tr -d ' '; }
image_before=$(stat -c %s "$img")
fs_before=$(var_df size)
free_before=$(var_df avail)
start=$(date +%s%N)
written=0
enospc=0
i=0
# Enough to cross the grow watermark of any image the demo disk can hold; stops at the grow.
while [ "$i" -lt 256 ]; do
	if ! dd if=/dev/urandom of="$dir/fill-$i" bs=1M count=16 conv=fsync status=none; then
		enospc=1
		break
	fi
	written=$((written + 16))
	i=$((i + 1))
	fs_now=$(var_df size)
	[ "$fs_now" -gt "$fs_before" ] && break
done
# The service may still be inside its step (the file system is grown last): wait for it.
n=0
while [ "$n" -lt 120 ]; do
	fs_now=$(var_df size)
	[ "$fs_now" -gt "$fs_before" ] && break
	sleep 1
	n=$((n + 1))
done
end=$(date +%s%N)
image_after=$(stat -c %s "$img")
fs_after=$(var_df size)
free_after=$(var_df avail)
active=$(systemctl is-active pystate-resized.service)
# What `pystate status` says now, in the booted system: mounts, image, TPM, the policy.
pystate status 2>&1 | sed 's/^/PYSTATE-DEMO-STATUS /'
# The service's own lines (it logs to /dev/kmsg, as in the initrd), from its start on,
# one console line each: a long line would be broken by kernel messages.
dmesg | sed -n '/pystate: resize service for/,$p' | grep 'pystate: ' \
	| sed 's/^\[[ 0-9.]*\] */PYSTATE-DEMO-LOG /'
echo "PYSTATE-DEMO-GROW {\"image_before\": $image_before, \"image_after\": $image_after," \
	"\"fs_before\": $fs_before, \"fs_after\": $fs_after, \"free_before\": $free_before," \
	"\"free_after\": $free_after, \"written_mib\": $written, \"enospc\": $enospc," \
	"\"ms\": $(( (end - start) / 1000000 )), \"service\": \"$active\"}"
"""


def install_fill_demo(root: Path) -> None:
    """The demo's fill unit (runs only on a boot with ``pystate-demo.fill``)."""
    units = root / "etc/systemd/system"
    (units / FILL_UNIT).write_text(FILL_SERVICE)
    _enable(root, FILL_UNIT, f"/etc/systemd/system/{FILL_UNIT}")
    script = root / "usr/local/sbin/pystate-demo-fill"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(FILL_SCRIPT)
    script.chmod(0o755)


@dataclass(frozen=True)
class Grow:
    """What the fill unit saw: encrypted.img and the file system inside, before and after."""

    image_before: int
    image_after: int
    fs_before: int
    fs_after: int
    free_before: int
    free_after: int
    written_mib: int
    enospc: bool
    ms: int
    service: str
    log: tuple[str, ...]
    status: tuple[str, ...] = ()

    @property
    def grew(self) -> bool:
        return self.image_after > self.image_before and self.fs_after > self.fs_before


def parse_grow(console: str) -> Grow | None:
    """The ``PYSTATE-DEMO-GROW`` line of a console with the status and log lines before it."""
    lines: dict[str, list[str]] = {LOG_PREFIX: [], STATUS_PREFIX: []}
    for line in console.splitlines():
        # Anywhere in the line: the console is shared (a getty's "login: " may come first).
        for prefix, found in lines.items():
            if (at := line.find(prefix)) >= 0:
                found.append(line[at + len(prefix) :])
                break
        else:
            if (at := line.find(GROW_PREFIX)) >= 0:
                d = json.loads(line[at + len(GROW_PREFIX) :])
                return Grow(
                    **{**d, "enospc": bool(d["enospc"])},
                    log=tuple(lines[LOG_PREFIX]),
                    status=tuple(lines[STATUS_PREFIX]),
                )
    return None
