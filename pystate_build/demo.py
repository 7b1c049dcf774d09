"""``build.py demo``: the README's first command.

Builds everything (kernel, frozen program, systemd dracut initrd with the pystate
module, a Debian root image, a signed UKI and systemd-boot on an EFI system partition,
a factory-fresh GPT disk with the ESP and the root only, an OVMF variable store with test
Secure Boot keys), then boots the same machine twice in QEMU under UEFI with Secure Boot on
and one software TPM — in the first boot systemd-repart makes the state partition from the
definition the package installed in the image, and pystate provisions it and seals to PCR 7;
the second unlocks — and prints the partition table before and after the first boot and, for
each boot, the Secure Boot state, the PCR binding, what pystate mounted where and how long
each of its steps took (from /run/pystate/boot.json in the guest).
The root is found as on a real machine: no root=, systemd-gpt-auto-generator follows
the boot loader's LoaderDevicePartUUID.

The Debian root carries pystate as an image build installs it (booted.install_pystate:
the payload and an enabled ``pystate-resized.service``). On the last boot a oneshot unit
fills /var, inside encrypted.img, until the service has grown the image: the demo ends
with that grow, its sizes before and after and the service's log lines.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from pystate_initrd.errors import PystateError

from . import OUT
from . import qemu_harness as harness
from .booted import Grow
from .disk import DiskLayout, reread_layout
from .roots import boot_json, console_value, parse_report

# Unpartitioned space on the factory-fresh disk: the state partition systemd-repart makes
# in it (~1.2 GiB) is the demo's pool, small enough for the fill to grow the image quickly.
FACTORY_FREE = 1280 << 20


class DemoError(PystateError):
    """A demo boot did not reach its end."""


def describe_boot(n: int, console: str, seconds: float) -> str:
    mounts, _, _ = parse_report(console)
    report = boot_json(console)
    lines = [f"── boot {n}: {seconds:.0f} s in QEMU (TCG, OVMF) ──"]
    lines.append(f"  secure boot: {secure_boot_state(console)}")
    if report is None:
        lines.append("  (no /run/pystate/boot.json in the guest)")
        return "\n".join(lines)
    lines.append(f"  outcome: {report.get('outcome')}   pystate total: {report.get('total_ms')} ms")
    lines.append(f"  TPM2 binding: {tpm_binding(report)}")
    pcr7 = console_value(console, "PCR7")
    if pcr7:
        lines.append(f"  PCR 7 now:   {pcr7.lower()} (the firmware's Secure Boot measurements)")
    state = report.get("state") or {}
    assert isinstance(state, dict)
    state_dev = str(state.get("device", ""))
    lines.append("  mounted:")
    for source, target, fstype, options, *_ in mounts:
        if source == state_dev or target.startswith("/state") or "pystate" in source:
            lines.append(f"    {target:<22} {source:<28} {fstype:<6} {options}")
    rejected = report.get("rejected") or []
    assert isinstance(rejected, list)
    for r in rejected:
        lines.append(f"  rejected: {r.get('area')} entry {r.get('name')!r}: {r.get('reason')}")
    lines.append("  steps:")
    steps = report.get("steps") or []
    assert isinstance(steps, list)
    for step in steps:
        detail = f"  {step['detail']}" if step.get("detail") else ""
        lines.append(f"    {step['name']:<16} {step['ms']:>8.1f} ms{detail}")
    return "\n".join(lines)


def describe_table(layout: DiskLayout, when: str) -> str:
    """The disk's GPT as pystate reads it: what the factory made, what the first boot added."""
    kinds = {"esp": "EFI system", "root": "root (erofs)", "state": "pystate state"}
    lines = [f"── partition table {when} ──"]
    for p in reread_layout(layout).partitions:
        lines.append(
            f"  {p.number}  {p.name or '-':<12} {kinds.get(p.role, p.type_uuid):<14} "
            f"{p.size / 2**20:>8.0f} MiB at {p.start / 2**20:.0f} MiB  PARTUUID {p.uuid}"
        )
    return "\n".join(lines)


def secure_boot_state(console: str) -> str:
    """The firmware's SecureBoot variable, as the booted system read it (and the kernel's word)."""
    value = console_value(console, "SECUREBOOT")
    said = [x.split("secureboot: ", 1)[1] for x in console.splitlines() if "secureboot: " in x]
    kernel = said[0].strip() if said else ""
    word = {"1": "on", "0": "off", "none": "no UEFI variable"}.get(value or "", "not reported")
    return f"{word}" + (f" (kernel: {kernel})" if kernel else "")


def tpm_binding(report: dict[str, object]) -> str:
    """The seal (first boot) or the unseal (later boots) as boot.json records it."""
    steps = report.get("steps") or []
    assert isinstance(steps, list)
    by_name = {s.get("name"): s for s in steps if isinstance(s, dict)}
    for name, verb in (("seal", "sealed"), ("unseal", "unsealed"), ("reseal", "re-sealed")):
        step = by_name.get(name)
        if step is not None:
            return f"{verb} {step.get('detail', '')}".strip()
    return "none"


def describe_grow(grow: Grow | None) -> str:
    lines = ["── the resize service, last boot: /var filled inside encrypted.img ──"]
    if grow is None:
        lines.append("  (no PYSTATE-DEMO-GROW line: the fill unit did not run)")
        return "\n".join(lines)

    def mib(n: int) -> str:
        return f"{n / 2**20:.0f} MiB"

    lines += [
        f"  pystate-resized.service: {grow.service}",
        f"  written to /var:   {grow.written_mib} MiB (16 MiB files, fsync'd)"
        + ("   ENOSPC reached" if grow.enospc else ", no ENOSPC"),
        f"  encrypted.img:     {mib(grow.image_before)} → {mib(grow.image_after)}",
        f"  /var file system:  {mib(grow.fs_before)} → {mib(grow.fs_after)}"
        f"   (free {mib(grow.free_before)} → {mib(grow.free_after)})",
        f"  from the first write to the larger file system: {grow.ms / 1000:.1f} s",
        "  the service's log:",
        *(f"    {line}" for line in grow.log),
        "  `pystate status` afterwards, in the booted system:",
        *(f"    {line}" for line in grow.status),
    ]
    return "\n".join(lines)


def run_demo(work: Path, *, boots: int = 2, keep: bool = False) -> int:
    from .booted import FILL_ON_UNLOCK, install_fill_demo, install_pystate, parse_grow
    from .disk import build_disk
    from .initrd import build_initrd, build_payload
    from .kernel import ensure_kernel
    from .roots import build_debian_root
    from .uefi import build_uefi_boot

    started = time.monotonic()
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    print("demo: kernel …", flush=True)
    kernel = ensure_kernel()
    print(f"demo: kernel {kernel.version}; initrd with the pystate module …", flush=True)
    initrd = build_initrd(work / "initrd.img", systemd=True, kernel=kernel)
    print(f"demo: initrd {initrd.stat().st_size / 2**20:.1f} MiB; Debian root …", flush=True)
    root = build_debian_root(work / "root", lists=["/home/demo"])
    (root / "home/demo").mkdir(parents=True, exist_ok=True)
    (root / "home/demo/hello.txt").write_text(
        "This file came with the image; the first boot seeded /home on the state from it.\n"
    )
    install_pystate(root, build_payload(work / "payload"))
    install_fill_demo(root)
    # No root=: the root partition is found through the boot loader (gpt-auto).
    chain = build_uefi_boot(
        work / "uefi",
        initrd=initrd,
        os_release=root / "usr/lib/os-release",
        cmdline=f"ro {FILL_ON_UNLOCK}",
        kernel=kernel.vmlinuz,
    )
    assert chain.keys is not None
    print(
        f"demo: UKI {chain.uki.name} ({chain.uki.stat().st_size / 2**20:.1f} MiB) and "
        f"systemd-boot signed with the test db key; OVMF store with test PK, KEK, db "
        f"({chain.keys.directory}), Secure Boot on"
    )
    # As it leaves the factory: no state partition; systemd-repart makes it in the first boot.
    layout = build_disk(work / "disk.img", root, None, esp=chain.esp, free=FACTORY_FREE)
    print(f"demo: disk {layout.path} ({layout.size / 2**30:.2f} GiB, factory-fresh)")
    print(describe_table(layout, "as the disk leaves the factory"))
    print(f"demo: built in {time.monotonic() - started:.0f} s; {boots} boots follow (TCG: slow)\n")
    tpm_state = work / "tpm"
    tpm_state.mkdir(exist_ok=True)
    for n in range(1, boots + 1):
        last = n == boots
        result = harness.boot(
            layout.path,
            uefi=chain.firmware,
            efi_vars=work / "efivars.fd",
            tpm_state=tpm_state,
            expect=["PYSTATE-DEBIAN-OK"],
            timeout=600,
            log=work / f"console-{n}.log",
        )
        print(describe_boot(n, result.console, result.duration))
        if n == 1:
            print(describe_table(layout, "after the first boot (systemd-repart made the state)"))
        if not result.ok:
            raise DemoError(
                f"boot {n} failed: {result.reason}",
                hint=f"the whole console is in {work / f'console-{n}.log'}",
            )
        if last:
            grow = parse_grow(result.console)
            print(describe_grow(grow))
            if grow is None or not grow.grew:
                raise DemoError(
                    "the resize service did not grow encrypted.img",
                    hint=f"see pystate-resized in {work / f'console-{n}.log'}",
                )
    print(f"\ndemo: done in {time.monotonic() - started:.0f} s; consoles in {work}/console-*.log")
    return 0


def _cmd(args: argparse.Namespace) -> int:
    return run_demo(Path(args.work), boots=args.boots)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo", help="build everything and boot the demo machine twice (UEFI, Secure Boot)"
    )
    p.add_argument("--work", default=str(OUT / "demo"), help="work directory (default out/demo)")
    p.add_argument("--boots", type=int, default=2, help="how many boots (default 2)")
    p.set_defaults(func=_cmd)
