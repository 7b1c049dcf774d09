"""Runs inside the QEMU guest of the resize tests and benchmark: ``python3 /rt/rt.py CMD``.

Copied into the guest root by bench_resize.build_guest_root(); imports pystate_initrd from
the frozen zipapp (/usr/bin/pystate), so it uses only the stdlib modules frozen with it.
Every result is one console line ``RT-<TAG> <json>``; the host parses them (bench_resize).
build.py imports it (it imports every module here) and finds no ``register``: nothing runs.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

STATE = "/state"
ENC = "/state/encrypted"
IMG = "/state/encrypted.img"
MIB = 1 << 20
DM = "/dev/mapper/pystate-encrypted"
# Inside the image's "var" entry (/var): a new top-level directory would be a mount entry.
DATA = f"{ENC}/var/lib/rt"


def cmdline():
    with open("/proc/cmdline") as f:
        return f.read()


def out(tag, **values):
    print(f"RT-{tag} {json.dumps(values, sort_keys=True)}", flush=True)


def space():
    o, i, st = os.statvfs(STATE), os.statvfs(ENC), os.stat(IMG)
    return {
        "outer_size": o.f_blocks * o.f_frsize,
        "outer_free": o.f_bavail * o.f_frsize,
        "image": st.st_size,
        "allocated": st.st_blocks * 512,
        "inner_size": i.f_blocks * i.f_frsize,
        "inner_used": (i.f_blocks - i.f_bfree) * i.f_frsize,
        "inner_free": min(i.f_bavail, i.f_bfree) * i.f_frsize,
    }


def write_file(path, mib, *, random=False):
    """Write mib MiB and fsync; the sha256. OSError (ENOSPC) propagates."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    block = os.urandom(MIB) if random else bytes(MIB)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
            digest.update(block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def sha(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def start_service(*extra):
    argv = ["/usr/bin/pystate", "resized", "--interval-min", "0.25", "--interval-max", "2"]
    return subprocess.Popen([*argv, *extra])


def stop_service(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    return proc.returncode


def kernel_errors():
    text = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    bad = ("i/o error", "buffer i/o", "ext4-fs error", "btrfs error", "critical", "enospc")
    return [line for line in text.splitlines() if any(b in line.lower() for b in bad)]


def layers():
    from pathlib import Path

    from pystate_initrd.volume import resize

    vol = resize.find_volume(Path(STATE))
    s = resize.sizes(vol)
    return vol, {"file": s.file, "loop": s.loop, "device": s.device, "fs": s.fs}


def keep_files(boot):
    """Write one fsynced random file for this boot; check every earlier one."""
    sums_path = f"{STATE}/keep-sums.json"  # the expected sums, on the outer fs
    sums = {}
    if os.path.exists(sums_path):
        with open(sums_path) as f:
            sums = json.load(f)
    bad = [p for p, h in sums.items() if not os.path.exists(p) or sha(p) != h]
    path = f"{DATA}/keep/boot-{boot}"
    sums[path] = write_file(path, 2, random=True)
    tmp = sums_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(sums, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, sums_path)
    fd = os.open(STATE, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return len(sums) - 1, bad


# --- scenarios ------------------------------------------------------------------------------


def cmd_fill(chunk_mib="16", pause="0.1", max_mib="0", *extra):
    """Write steadily into the encrypted area with the service running, until ENOSPC
    (or max_mib MiB when not 0)."""
    keep = {f"{DATA}/keep/{k}": write_file(f"{DATA}/keep/{k}", 4, random=True) for k in range(4)}
    start = space()
    svc = start_service(*extra)
    time.sleep(1)
    images, written, n, enospc, t0 = [start["image"]], 0, 0, None, time.monotonic()
    while True:
        try:
            write_file(f"{DATA}/fill/{n}", int(chunk_mib))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            enospc = space()
            break
        n += 1
        written += int(chunk_mib)
        images.append(os.stat(IMG).st_size)
        if int(max_mib) and written >= int(max_mib):
            break
        time.sleep(float(pause))
    seconds = time.monotonic() - t0
    time.sleep(2)
    # A writer that meets ENOSPC while the service's last grow step is still running gets
    # that step's space when it tries again: top up in small chunks until ENOSPC once more,
    # so "end" shows whether anything of the pool was left unused.
    topped_up = 0
    while enospc is not None and topped_up < 256:
        try:
            write_file(f"{DATA}/fill/top-{topped_up}", 4)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            break
        topped_up += 4
        time.sleep(0.2)
    time.sleep(1)
    status = stop_service(svc)
    out(
        "FILL",
        start=start,
        enospc=enospc,
        written_mib=written,
        topped_up_mib=topped_up,
        seconds=round(seconds, 1),
        images=sorted(set(images)),
        end=space(),
        service_status=status,
        keep=keep,
        errors=kernel_errors(),
    )


def cmd_markers(marker, count="64"):
    """Files whose names and contents carry ``marker`` (inside the image), every other one
    deleted again: plaintext the inner file system holds in directories, inode tables and
    free blocks, which must never reach /state in the clear (the shrink's undo area)."""
    d = f"{DATA}/markers"
    os.makedirs(d, exist_ok=True)
    body = marker.encode() * (256 * 1024 // len(marker))
    for i in range(int(count)):
        with open(f"{d}/{marker}-{i}", "wb") as f:
            f.write(body)
            os.fsync(f.fileno())
    for i in range(0, int(count), 2):
        os.unlink(f"{d}/{marker}-{i}")
    subprocess.run(["sync"], check=False)
    out("MARKERS", count=int(count))


def cmd_delete_and_shrink(*extra):
    """Delete the fill files, then one policy step by hand (btrfs: online; ext4: request)."""
    import shutil

    before = space()
    shutil.rmtree(f"{DATA}/fill", ignore_errors=True)
    subprocess.run(["sync"], check=False)
    time.sleep(1)
    proc = subprocess.run(
        ["/usr/bin/pystate", "resize", "--auto", *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    request = None
    if os.path.exists(f"{STATE}/.pystate/shrink-request"):
        with open(f"{STATE}/.pystate/shrink-request") as f:
            request = json.load(f)
    keep = {p: sha(p) for p in sorted(_keep_paths())}
    scrub = None
    if _fstype(ENC) == "btrfs":
        # btrfs's online check: every data and metadata checksum read and verified.
        scrub = subprocess.run(
            ["btrfs", "scrub", "start", "-B", ENC], capture_output=True, text=True, check=False
        ).returncode
    out(
        "SHRINK",
        scrub_status=scrub,
        before=before,
        after=space(),
        status=proc.returncode,
        output=(proc.stdout + proc.stderr).strip().splitlines(),
        request=request,
        keep=keep,
        errors=kernel_errors(),
    )


def _fstype(mountpoint):
    with open("/proc/self/mounts") as f:
        types = [line.split()[2] for line in f if line.split()[1] == mountpoint]
    return types[-1] if types else None


def _keep_paths():
    d = f"{DATA}/keep"
    return [f"{d}/{n}" for n in os.listdir(d)] if os.path.isdir(d) else []


def cmd_offline_shrink():
    """What the initrd does at the next boot, run here on the unmounted image for real."""
    from pathlib import Path

    from pystate_initrd import config, log, report
    from pystate_initrd.initrd import offline_shrink

    _, sizes_before = layers()
    from pystate_initrd.volume import resize

    loop = "/dev/" + os.listdir(f"/sys/block/{resize.block_name(DM)}/slaves")[0]
    for target in ("/etc", "/var", ENC):
        subprocess.run(["umount", target], check=False)
    cfg = config.load_config(None, cmdline())
    rep = report.BootReport(log.Log())
    t0 = time.monotonic()
    detail = offline_shrink.apply_pending_shrink(cfg, Path(STATE), loop, rep)
    seconds = time.monotonic() - t0
    fsck = subprocess.run(["e2fsck", "-f", "-n", DM], capture_output=True, text=True, check=False)
    subprocess.run(["mount", "-t", "ext4", DM, ENC], check=True)
    _, sizes_after = layers()
    keep = {p: sha(p) for p in sorted(_keep_paths())}
    out(
        "OFFLINE",
        detail=detail,
        seconds=round(seconds, 2),
        before=sizes_before,
        after=sizes_after,
        space=space(),
        fsck_status=fsck.returncode,
        fsck=fsck.stdout.strip().splitlines()[-3:],
        request_left=os.path.exists(f"{STATE}/.pystate/shrink-request"),
        keep=keep,
        errors=kernel_errors(),
    )


def cmd_home(*extra):
    """Fill /home (plain) until ENOSPC with the service running; then write encrypted."""
    start = space()
    svc = start_service(*extra)
    time.sleep(1)
    n, home_error = 0, None
    while True:
        try:
            write_file(f"/home/fill/{n}", 16)
        except OSError as exc:
            home_error = exc.errno
            break
        n += 1
    full = space()
    time.sleep(4)  # the service sees a full outer file system
    settled = space()
    enc_ok, enc_error = True, None
    want = max(0, min(64, settled["inner_free"] // MIB - 8))
    try:
        write_file(f"{DATA}/after-home", want, random=True)
    except OSError as exc:
        enc_ok, enc_error = False, exc.errno
    stop_service(svc)
    import shutil

    shutil.rmtree("/home/fill", ignore_errors=True)
    out(
        "HOME",
        start=start,
        full=full,
        settled=settled,
        end=space(),
        home_mib=n * 16,
        home_errno=home_error,
        enc_mib=want,
        enc_ok=enc_ok,
        enc_errno=enc_error,
        errors=kernel_errors(),
    )


def cmd_crash(boot, step, grow_mib="64", *extra):
    """Check the earlier boots' files and the layers, then resize and cut the power at step."""
    from pystate_initrd import log
    from pystate_initrd.booted import resized
    from pystate_initrd.volume import resize

    checked, bad = keep_files(int(boot))
    vol, before = layers()
    svc = resized.make_service(None, None, {}, log=log.Log(), status_file=None)
    recovered = svc.recover()
    _, after = layers()
    out(
        "CRASH-CHECK",
        boot=int(boot),
        checked=checked,
        bad=bad,
        layers_at_boot=before,
        layers_after_recover=after,
        recovered=recovered.to_json() if recovered else None,
        problems=resize.Sizes(**before).problems(vol.header),
        errors=kernel_errors(),
    )
    if step == "none":
        return
    size = os.stat(IMG).st_size
    argv = ["/usr/bin/pystate", "resize", "--log", "/dev/kmsg", *extra]
    if step in resize.SHRINK_STEPS and vol.fstype == "btrfs":
        # Room to shrink first: grow (uncut), then shrink back to the size now, with the cut.
        subprocess.run([*argv, "--to", str(size + int(grow_mib) * MIB)], check=False)
        target = size
    else:
        target = size + int(grow_mib) * MIB
    proc = subprocess.run(
        [*argv, "--to", str(target), "--debug-stop", step],
        capture_output=True,
        text=True,
        check=False,
    )
    print(proc.stdout + proc.stderr, flush=True)
    out("CRASH-NOT-CUT", step=step, status=proc.returncode, output=proc.stdout + proc.stderr)


def cmd_bench_grow(runs="5", *extra):
    """Crossing the grow watermark -> the larger size usable, several times; then throughput.

    The writer writes 1 MiB at a time and asks the policy after each MiB; the crossing is
    the first look at which it decides "grow" (free below half the buffer, and the change
    not under the 5 % step: until then the service rightly waits). It then stops
    writing and polls (10 ms) until the inner file system reports more blocks. A crossing the
    service handled within the MiB that crossed (the size grew before the look) is counted
    as missed, not measured. The service runs with its default intervals (0.5-30 s).
    """
    from pathlib import Path

    from pystate_initrd.booted import resized
    from pystate_initrd.formats.resize_policy import Action, decide
    from pystate_initrd.volume import resize

    _, params = resized.load_params(None, {})
    vol = resize.find_volume(Path(STATE))
    svc = subprocess.Popen(["/usr/bin/pystate", "resized", *extra])
    time.sleep(2)
    latencies, throughputs, grows, missed, n = [], [], [], 0, 0
    block = bytes(MIB)
    os.makedirs(f"{DATA}/bench", exist_ok=True)
    fd = os.open(f"{DATA}/bench/data", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    error = None
    try:
        while len(latencies) < int(runs):
            blocks = os.statvfs(ENC).f_blocks
            try:
                os.write(fd, block)
            except OSError as exc:
                error = exc.errno
                break
            n += 1
            if os.statvfs(ENC).f_blocks != blocks:
                missed += 1
                continue
            if decide(resize.measure(vol), params).action is not Action.GROW:
                continue
            crossed = time.monotonic()
            while os.statvfs(ENC).f_blocks == blocks and time.monotonic() - crossed < 60:
                time.sleep(0.01)
            latencies.append(round(time.monotonic() - crossed, 3))
            time.sleep(1.0)  # the service writes resize.json after its step
            with open("/run/pystate/resize.json") as f:
                change = json.load(f).get("last_change") or {}
            if change.get("action") == "grow" and change.get("seconds"):
                throughputs.append((change["after"] - change["before"]) / change["seconds"])
                grows.append(change)
    finally:
        os.close(fd)
    stop_service(svc)
    out(
        "BENCH-GROW",
        latencies=latencies,
        throughputs=throughputs,
        grows=grows,
        missed=missed,
        written_mib=n,
        error=error,
        space=space(),
    )
    os.unlink(f"{DATA}/bench/data")


# --- build.py torture (pystate_build/torture.py): power cuts at random instants ------------
#
# Every torture boot that reaches here runs tt-check first: it checks what the previous
# boot (maybe cut) left. The writer logs each file only once its data and its directory
# entry are fsync'd: "TT-FSYNC <name> <sha256>"; the host verifies every logged file at
# the next check. Lines are written with one write(2) each and the console's printk level
# is lowered first, so kernel messages do not split them.

TT = f"{DATA}/tt"  # the writer's files, inside the image
INNER_MARK = f"{DATA}/marker"  # written once; must survive every cut but a factory reset
OUTER_MARK = f"{STATE}/.torture-marker"  # on the outer fs (a dot name: a reset keeps it)
TT_FILE_KIB = 512


def say(line):
    os.write(1, (line + "\n").encode())


def quiet_console():
    """Kernel messages off the console: they would split the guest's lines."""
    with open("/proc/sys/kernel/printk", "w") as f:
        f.write("1")


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_of(mountpoint):
    with open("/proc/self/mounts") as f:
        found = [line.split()[0] for line in f if line.split()[1] == mountpoint]
    return found[-1] if found else None


def frozen_check(mountpoint, device, fstype):
    """fsck -n of a mounted file system, frozen meanwhile (FIFREEZE flushes the journal and
    clears needs_recovery, so the device holds a consistent file system)."""
    if fstype == "btrfs":
        argv = ["btrfs", "check", "--readonly", "--force", device]
    else:
        argv = ["e2fsck", "-f", "-n", device]
    frozen = subprocess.run(["fsfreeze", "-f", mountpoint], capture_output=True, check=False)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    finally:
        if frozen.returncode == 0:
            subprocess.run(["fsfreeze", "-u", mountpoint], check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "device": device,
        "fstype": fstype,
        "status": proc.returncode,
        "frozen": frozen.returncode == 0,
        "tail": lines[-6:],
    }


def unnamed_keyslots():
    """Keyslots of encrypted.img that no token names, besides the recovery keyslot (1):
    what a cut re-seal would leak (none once the next boot finished it)."""
    if not os.path.exists(IMG):
        return None
    proc = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", IMG],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        return None
    meta = json.loads(proc.stdout)
    named = {int(k) for t in meta["tokens"].values() for k in t.get("keyslots", [])}
    return sorted(int(k) for k in meta["keyslots"] if int(k) not in named | {1})


def cmd_tt_check():
    """What the previous boot left: markers, image, every writer file's sha, both fsck."""
    quiet_console()
    image = {
        "img": os.path.exists(IMG),
        "new": os.path.exists(IMG + ".new"),
        "mapped": os.path.exists(DM),
        "mounted": source_of(ENC) is not None,
        "size": os.stat(IMG).st_size if os.path.exists(IMG) else None,
        "unnamed_keyslots": unnamed_keyslots(),
    }
    out("TT-IMAGE", **image)
    for name, path in (("outer", OUTER_MARK), ("inner", INNER_MARK)):
        say(f"TT-MARK {name} {sha(path) if os.path.isfile(path) else 'absent'}")
    key = f"{ENC}/.pystate/recovery-key"
    if os.path.isfile(key):
        with open(key) as f:
            say(f"TT-RECOVERY {f.read().strip()}")
    names = sorted(os.listdir(TT)) if os.path.isdir(TT) else []
    for name in names:
        say(f"TT-HAVE {name} {sha(f'{TT}/{name}')}")
    say(f"TT-HAVE-END {len(names)}")
    checks = {}
    if image["mounted"]:
        checks["inner"] = frozen_check(ENC, DM, _fstype(ENC))
    checks["outer"] = frozen_check(STATE, source_of(STATE), _fstype(STATE))
    out("TT-FSCK", **checks)
    import shutil

    shutil.rmtree(TT, ignore_errors=True)  # checked: room for the next boot's writer
    if image["mounted"] and not os.path.isfile(INNER_MARK):
        # a new image (first boot, factory reset): the marker for the cuts to come
        os.makedirs(DATA, exist_ok=True)
        write_file(INNER_MARK, 1, random=True)
        fsync_dir(DATA)
        say(f"TT-MARK-NEW inner {sha(INNER_MARK)}")
    subprocess.run(["sync"], check=False)
    out("TT-CHECKED", files=len(names))


class Writer:
    """A thread writing TT_FILE_KIB files, each fsync'd (data, then its directory) and then
    logged with its sha256; stops on stop() or on an error (logged, e.g. ENOSPC)."""

    def __init__(self, prefix):
        import threading

        self.prefix, self.count, self.error = prefix, 0, None
        self.stopping = threading.Event()
        os.makedirs(TT, exist_ok=True)
        fsync_dir(DATA)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            name = f"{self.prefix}-{self.count:05d}"
            data = os.urandom(TT_FILE_KIB * 1024)
            try:
                fd = os.open(f"{TT}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(TT)
            except OSError as exc:
                self.error = f"{name}: {exc}"
                say(f"TT-WRITER-ERROR {self.error}")
                return
            say(f"TT-FSYNC {name} {hashlib.sha256(data).hexdigest()}")
            self.count += 1

    def stop(self):
        self.stopping.set()
        self.thread.join()
        return {"files": self.count, "error": self.error}


def _resize_to(size, *extra):
    """pystate resize --to size; each line it prints is echoed at once as TT-RESIZE <line>
    (a pty, so its stdout is line-buffered): the decision comes just before the steps."""
    t0 = time.monotonic()
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["/usr/bin/pystate", "resize", "--log", "/dev/kmsg", "--to", str(size), *extra],
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    lines, pending = [], b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its side
            data = b""
        if not data:
            break
        *complete, pending = (pending + data).split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace").strip()
            lines.append(line)
            say(f"TT-RESIZE {line}")
    os.close(master)
    return {
        "status": proc.wait(),
        "ms": round((time.monotonic() - t0) * 1000),
        "output": lines[-3:],
    }


def cmd_tt_grow(boot, mib="128"):
    """An online grow under the writer: the host cuts between TT-GO and TT-RESIZED."""
    quiet_console()
    writer = Writer(f"b{boot}")
    time.sleep(1)
    size = os.stat(IMG).st_size
    say("TT-GO grow")
    result = _resize_to(size + int(mib) * MIB)
    say(f"TT-RESIZED {json.dumps(result)}")
    time.sleep(1)
    out("TT-GROW", before=size, after=os.stat(IMG).st_size, resize=result, writer=writer.stop())


def cmd_tt_shrink(boot, mib="128"):
    """btrfs: grow by mib (uncut), then the online shrink back under the writer."""
    quiet_console()
    size = os.stat(IMG).st_size
    grown = _resize_to(size + int(mib) * MIB)
    writer = Writer(f"b{boot}")
    time.sleep(1)
    say("TT-GO shrink")
    result = _resize_to(size)
    say(f"TT-RESIZED {json.dumps(result)}")
    time.sleep(1)
    out("TT-SHRINK", grown=grown, before=size + int(mib) * MIB, after=os.stat(IMG).st_size,
        resize=result, writer=writer.stop())  # fmt: skip


def cmd_tt_arm_shrink(boot, mib="192"):
    """ext4: grow by mib, write (and log) files into the grown image, ask for the shrink
    back: the next boot's initrd carries it out offline (resize2fs moves those files)."""
    quiet_console()
    size = os.stat(IMG).st_size
    grown = _resize_to(size + int(mib) * MIB)
    writer = Writer(f"b{boot}")
    time.sleep(8)
    written = writer.stop()
    request = _resize_to(size)
    armed = os.path.exists(f"{STATE}/.pystate/shrink-request")
    out("TT-ARMED", grown=grown, request=request, armed=armed, writer=written, size=size)


def cmd_dm_flags(*flags):
    """Reload the mapping's table with dm-crypt optional flags added (a benchmark's lever).

    ``bench-resize --dm-flag no_write_workqueue`` measures whether a flag shortens the grow's
    table swap. The parameters hold the key: they stay in bytearrays, wiped after the load.
    """
    from pystate_initrd.formats import dm_table
    from pystate_initrd.system import devmapper

    name = DM.rsplit("/", 1)[1]
    status = dm_table.dm_table_request(name)
    params = bytearray()
    load = bytearray()
    try:
        devmapper._ioctl(dm_table.DM_TABLE_STATUS, status, f"reading the table of {name}")
        target = dm_table.dm_crypt_target(status, name)
        fields = status[target.params].split(b" ")
        optional = fields[6:] + [flag.encode() for flag in flags]
        params = bytearray(b" ".join([*fields[:5], str(len(optional)).encode(), *optional]))
        for field in fields:
            field[:] = bytes(len(field))
        reply = params + b"\0"
        new = dm_table.CryptTarget(
            target.start, target.length, target.readonly, slice(0, len(params))
        )
        load = dm_table.dm_table_load_request(name, new, reply, target.length)
        reply[:] = bytes(len(reply))
        devmapper._ioctl(dm_table.DM_TABLE_LOAD, load, f"loading the table of {name}")
        devmapper._ioctl(dm_table.DM_DEV_SUSPEND, dm_table.dm_resume_request(name), "resume")
    finally:
        for buf in (status, params, load):
            buf[:] = bytes(len(buf))
    out("DM-FLAGS", asked=list(flags), options=_dm_options())  # read back from the kernel


def _dm_options():
    """The optional parameters of the mapping's dm-crypt table (flags; the key is not one)."""
    from pystate_initrd.formats import dm_table
    from pystate_initrd.system import devmapper

    name = DM.rsplit("/", 1)[1]
    status = dm_table.dm_table_request(name)
    try:
        devmapper._ioctl(dm_table.DM_TABLE_STATUS, status, f"reading the table of {name}")
        target = dm_table.dm_crypt_target(status, name)
        return [bytes(f).decode() for f in status[target.params].split(b" ")[6:]]
    finally:
        status[:] = bytes(len(status))


def cmd_dm_options():
    """Print the mapping's dm-crypt flags (the table as the kernel has it now)."""
    out("DM-OPTIONS", options=_dm_options())


COMMANDS = {
    "fill": cmd_fill,
    "markers": cmd_markers,
    "delete-and-shrink": cmd_delete_and_shrink,
    "offline-shrink": cmd_offline_shrink,
    "home": cmd_home,
    "crash": cmd_crash,
    "bench-grow": cmd_bench_grow,
    "dm-flags": cmd_dm_flags,
    "dm-options": cmd_dm_options,
    "tt-check": cmd_tt_check,
    "tt-grow": cmd_tt_grow,
    "tt-shrink": cmd_tt_shrink,
    "tt-arm-shrink": cmd_tt_arm_shrink,
}


def main():
    sys.path.insert(0, "/usr/lib/pystate/pystate.zip")  # the frozen program's modules (guest only)
    for word in cmdline().split():
        if word.startswith("rt.run="):
            for command in word[len("rt.run=") :].split(";"):
                name, *args = command.split(",")
                out("BEGIN", command=name, args=args)
                try:
                    COMMANDS[name](*args)
                except Exception as exc:  # reported, the next command still runs
                    out("FAILED", command=name, error=f"{type(exc).__name__}: {exc}")
    out("DONE")


if __name__ == "__main__":
    main()
