"""Runs inside the fault-torture guest as /rt/rt.py: guest_resize's commands plus three more.

torture_faults.build_root copies guest_resize.py as /rt/rt_resize.py and this file as
/rt/rt.py; ``rt.run=`` names the commands, each prints ``RT-<TAG> <json>``:

- ``marker``: the marker inside the image (made on the first call, checked after), the plain
  one in /home, the recovery key (for the host to answer a prompt with);
- ``grow,MIB``: fsync'd files written with the resize service running, until MIB or an
  error; every file whose write and fsync succeeded is read back from the disk;
- ``full,SECONDS``: /home (plain) and /var (in the image) written to ENOSPC at once while
  files in the image are rewritten in place, the service running; then the inner file system
  unmounted and checked.

build.py imports it and finds no ``register``: nothing runs on the host.
"""

import errno
import hashlib
import os
import subprocess
import sys
import threading
import time

try:
    import rt_resize as base  # in the guest
except ModuleNotFoundError:  # on the host: build.py imports every module of pystate_build
    from pystate_build import guest_resize as base

MIB = 1 << 20
MARKER = f"{base.DATA}/torture-marker"
HOME_MARKER = "/home/torture-marker"
KEY = f"{base.ENC}/.pystate/recovery-key"


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        return f"<{errno.errorcode.get(exc.errno, exc.errno)}>".encode()


def cmd_marker():
    created = not os.path.exists(MARKER)
    if created:
        base.write_file(MARKER, 1, random=True)
    key = _read(KEY).decode(errors="replace").strip()
    base.out(
        "MARKER",
        created=created,
        marker=base.sha(MARKER),
        home=hashlib.sha256(_read(HOME_MARKER)).hexdigest(),
        recovery_key=key,
        errors=base.kernel_errors(),
    )


def _drop_caches():
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cmd_grow(mib="256"):
    svc = base.start_service()
    time.sleep(1)
    sums, failure, n = {}, None, 0
    while n * 8 < int(mib):
        path = f"{base.DATA}/grow/{n}"
        try:
            sums[path] = base.write_file(path, 8, random=True)
        except OSError as exc:
            failure = errno.errorcode.get(exc.errno, str(exc.errno))
            break
        n += 1
    time.sleep(2)
    status = base.stop_service(svc)
    _drop_caches()
    bad = [p for p, h in sums.items() if _sha_or_error(p) != h]
    base.out(
        "GROW",
        files=len(sums),
        failure=failure,
        bad=bad,
        service_status=status,
        space=base.space(),
        errors=base.kernel_errors(),
    )


def _sha_or_error(path):
    try:
        return base.sha(path)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


class Writer(threading.Thread):
    """Writes 8 MiB fsync'd files under ``top`` until an error; keeps the good ones' sums."""

    def __init__(self, top):
        super().__init__(daemon=True)
        self.top, self.sums, self.error = top, {}, None

    def run(self):
        n = 0
        while True:
            path = f"{self.top}/{n}"
            try:
                self.sums[path] = base.write_file(path, 8)
            except OSError as exc:
                self.error = errno.errorcode.get(exc.errno, str(exc.errno))
                # a half-written file is the writer's own to remove: not data it was promised
                if os.path.exists(path):
                    os.unlink(path)
                return
            n += 1


class Rewriter(threading.Thread):
    """Rewrites files in the image in place (no truncation: the blocks stay allocated) with
    new random content and fsync, until told to stop; the last good content's sum per file."""

    def __init__(self, paths):
        super().__init__(daemon=True)
        self.paths, self.sums, self.errors, self.rounds = paths, {}, [], 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for path in self.paths:
                data = os.urandom(4 * MIB)
                try:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.pwrite(fd, data, 0)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    self.errors.append(f"{path}: {errno.errorcode.get(exc.errno, exc.errno)}")
                    continue
                self.sums[path] = hashlib.sha256(data).hexdigest()
            self.rounds += 1


def cmd_full(seconds="900"):
    paths = [f"{base.DATA}/rewrite/{k}" for k in range(4)]
    for path in paths:
        base.write_file(path, 4, random=True)
    reserve = _reserve()
    start = base.space()
    svc = base.start_service()
    time.sleep(1)
    home, var = Writer("/home/fill"), Writer(f"{base.DATA}/fill")
    rewriter = Rewriter(paths)
    samples, reserve_broken = [], []
    for t in (var, rewriter):
        t.start()
    t0 = time.monotonic()
    deadline = t0 + float(seconds)
    last, home_at = base.space(), None
    while (home.is_alive() or var.is_alive() or home_at is None) and time.monotonic() < deadline:
        # /home starts once the service has grown the image (or after 60 s): both areas
        # then race for what is left, with grows under way.
        if home_at is None and (last["image"] > start["image"] or time.monotonic() - t0 > 60):
            home.start()
            home_at = round(time.monotonic() - t0, 1)
        time.sleep(0.25)
        now = base.space()
        # The service may grow only while the outer file system is above its reserve.
        if now["image"] > last["image"] and last["outer_free"] < reserve:
            reserve_broken.append({"before": last, "after": now})
        samples.append(now["image"])
        last = now
    time.sleep(3)  # the service's last look at the full pool
    rewriter.stop.set()
    rewriter.join(60)
    status = base.stop_service(svc)
    end = base.space()
    _drop_caches()
    lost = [p for p, h in {**home.sums, **var.sums, **rewriter.sums}.items()
            if _sha_or_error(p) != h]  # fmt: skip
    errors = base.kernel_errors()
    fsck = _inner_fsck()
    base.out(
        "FULL",
        start=start,
        end=end,
        reserve=reserve,
        home_error=home.error,
        var_error=var.error,
        home_files=len(home.sums),
        var_files=len(var.sums),
        rewrites=rewriter.rounds,
        rewrite_errors=rewriter.errors[:5],
        lost=lost[:5],
        reserve_broken=reserve_broken[:3],
        images=sorted(set(samples)),
        service_status=status,
        timed_out=home.is_alive() or var.is_alive(),
        home_started=home_at,
        fsck=fsck,
        errors=errors,
    )


def _reserve():
    """The outer reserve the service keeps (its own parameters)."""
    from pystate_initrd.booted import resized
    from pystate_initrd.formats import resize_policy

    _, params = resized.load_params(None, {})
    outer = os.statvfs(base.STATE)
    return resize_policy.reserve(outer.f_blocks * outer.f_frsize, params)


def _inner_fsck():
    """Unmount the image's file system and check it read-only: (status, last lines)."""
    for target in ("/etc", "/var", base.ENC):
        subprocess.run(["umount", target], check=False, capture_output=True)
    proc = subprocess.run(
        ["e2fsck", "-f", "-n", base.DM], capture_output=True, text=True, check=False
    )
    return {"status": proc.returncode, "tail": proc.stdout.strip().splitlines()[-3:]}


if __name__ == "__main__":
    base.COMMANDS.update({"marker": cmd_marker, "grow": cmd_grow, "full": cmd_full})
    sys.exit(base.main())
