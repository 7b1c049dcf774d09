"""Argument parsing and error reporting for the pystate command.

What the initrd runs starts fast (docs/build.md, "Start time"): subcommands import
their modules lazily, and exactly ``pystate --version`` and ``pystate boot`` (no
options: pystate.service's command) skip argparse, whose imports (re, gettext,
locale, shutil, textwrap) cost more than the rest of the start. Every other command
line, ``boot`` with options included, goes through the parser, which is built from
the same table of boot options. Library code raises PystateError; only main()
turns it into one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import sys

from pystate_initrd import __version__
from pystate_initrd.errors import PystateError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    _T = TypeVar("_T")

EFIVARS = "/sys/firmware/efi/efivars"
# `pystate boot`'s options: (option, default, help). The parser and the fast path of a bare
# `pystate boot` both take them from here; each names a field of initrd.boot.BootPaths.
BOOT_OPTIONS = (
    ("--sysroot", "/sysroot", "the new root (default /sysroot)"),
    ("--config", "/etc/pystate/pystate.conf", "trusted configuration"),
    ("--cmdline", "/proc/cmdline", "kernel command line file"),
    ("--run-dir", "/run/pystate", "where boot.json goes"),
    ("--log", "/dev/kmsg", "log device or file (default /dev/kmsg)"),
    ("--efivars", EFIVARS, f"efivarfs (default {EFIVARS})"),
)


def _boot_defaults() -> dict[str, str]:
    """``pystate boot``'s options as argparse would give them for a bare ``pystate boot``."""
    return {option[2:].replace("-", "_"): default for option, default, _help in BOOT_OPTIONS}


def _boot(options: dict[str, str]) -> int:
    from pathlib import Path

    from pystate_initrd.initrd.boot import BootPaths, run_boot

    return run_boot(BootPaths(**{name: Path(value) for name, value in options.items()}))


def _cmd_boot(args: argparse.Namespace) -> int:
    return _boot({name: getattr(args, name) for name in _boot_defaults()})


def _version() -> str:
    from pystate_initrd.volume import hooks

    build = " (test build: test hooks included)" if hooks.TEST_BUILD else ""
    return f"pystate {__version__}{build}"


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pystate_initrd import config as config_mod
    from pystate_initrd.formats import plan
    from pystate_initrd.initrd import state_tree

    cfg = config_mod.load_config(Path(args.config) if args.config else None, "")
    mount_plan = state_tree.build_plan(
        Path(args.state),
        Path(args.encrypted) if args.encrypted else None,
        plain_allowlist=cfg.plain_allowlist,
        modes={t: plan.MountMode(m) for t, m in cfg.mount_modes.items()},
    )
    if args.json:
        print(json.dumps(mount_plan.to_json(), indent=2))
    else:
        sysroot = Path(args.sysroot)
        rows = [("AREA", "ENTRY", "TARGET", "MODE", "OPTIONS")]
        for m in mount_plan.mounts:
            target = str(sysroot / m.target.lstrip("/"))
            rows.append((str(m.area), m.name, target, str(m.mode), ",".join(m.options) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[-1]]))
        for r in mount_plan.rejected:
            print(f"rejected {r.area} entry {r.name!r}: {r.reason}")
    return 1 if mount_plan.rejected else 0


def _cmd_gpt(args: argparse.Namespace) -> int:
    import json

    from pystate_initrd.formats import gpt
    from pystate_initrd.system import block

    table = block.read_gpt(args.image)
    if args.json:
        print(json.dumps(table.to_json(), indent=2))
        return 0
    print(f"{args.image}: GPT, {table.sector_size}-byte sectors, disk GUID {table.disk_guid}")
    if table.used_backup:
        print("warning: the primary GPT is damaged; read from the backup header")
    for p in table.partitions:
        mark = "  <- pystate state partition" if p.type_guid == gpt.STATE_TYPE_GUID else ""
        print(
            f"{p.index:>3}  {p.first_lba:>10}-{p.last_lba:<10} {p.size:>14}  "
            f"{p.type_guid}  {p.part_guid}  attrs={p.attributes:#x}  {p.name!r}{mark}"
        )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pystate_initrd.booted import status

    info = status.collect(
        Path(args.boot_json),
        Path(args.root),
        tcti=args.tcti,
        event_log=args.event_log,
        efivars=Path(args.efivars) if args.efivars else None,
    )
    print(json.dumps(info, indent=2) if args.json else status.render(info))
    return 0 if info.get("outcome") == "ok" else 1


def _cmd_resized(args: argparse.Namespace) -> int:
    from pystate_initrd.booted import resized

    return resized.cmd_resized(args)


def _cmd_resize(args: argparse.Namespace) -> int:
    from pystate_initrd.booted import resized

    return resized.cmd_resize(args)


def _cmd_factory_reset(args: argparse.Namespace) -> int:
    from pystate_initrd.booted import factory_reset

    return factory_reset.cmd_factory_reset(args)


def _resize_options(p: argparse.ArgumentParser) -> None:
    import argparse

    p.add_argument("--state", help="the state directory (default /state, else /run/pystate/state)")
    p.add_argument(
        "--config",
        help="pystate.conf (default: /run/pystate/pystate.conf, the one the initrd used; "
        "else /etc/pystate/pystate.conf)",
    )
    p.add_argument("--log", default="/dev/kmsg", help="log device or file (default /dev/kmsg)")
    for hidden in ("--buffer-min", "--margin-min"):  # tests on small disks
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # no LUKS (tests)


def _parser() -> argparse.ArgumentParser:
    import argparse

    from pystate_initrd.volume import hooks

    parser = argparse.ArgumentParser(prog="pystate", description="pystate state partition tool")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("boot", help="(initrd) mount the state partition and its entries")
    for option, default, text in BOOT_OPTIONS:
        p.add_argument(option, default=default, help=text)
    p.set_defaults(func=_cmd_boot)

    p = sub.add_parser("plan", help="show the mount plan for a state tree")
    p.add_argument("--state", required=True, help="the plain state directory")
    p.add_argument("--encrypted", help="the opened encrypted image's directory")
    p.add_argument("--sysroot", required=True, help="the new root the targets are under")
    p.add_argument("--config", help="pystate.conf (default: built-in defaults)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("status", help="the state partition, encrypted.img, mounts, boot timings")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--boot-json", default="/run/pystate/boot.json", help="the initrd's report")
    p.add_argument("--root", default="/", help="the booted system's root (default /)")
    p.add_argument("--tcti", help="TPM2 TCTI for reading PCRs (default device:/dev/tpmrm0)")
    p.add_argument("--event-log", help="firmware event log (default: the kernel's, securityfs)")
    p.add_argument("--efivars", help="efivarfs, for a pending reset (default: under --root)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("resized", help="the resize service: grow/shrink encrypted.img as needed")
    _resize_options(p)
    p.add_argument("--interval-min", type=float, default=0.5, help="seconds (default 0.5)")
    p.add_argument("--interval-max", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--debug", action="store_true", help="log every decision")
    p.set_defaults(func=_cmd_resized)

    p = sub.add_parser("resize", help="resize encrypted.img once, by hand or by the policy")
    _resize_options(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", metavar="SIZE", help="resize encrypted.img to SIZE (e.g. 4G)")
    what.add_argument("--auto", action="store_true", help="one step of the policy")
    hooks.add_resize_options(p)  # a test build's crash tests; nothing in production
    p.set_defaults(func=_cmd_resize)

    p = sub.add_parser(
        "factory-reset",
        help="request a factory reset at the next boot (a one-shot boot entry)",
        description="Request a factory reset for the next boot: the boot loader starts the "
        "reset entry once, and pystate in the initrd crypto-erases encrypted.img, deletes the "
        "plain entries and provisions afresh. Without --yes nothing is changed (exit status "
        "2). docs/factory-reset.md.",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--yes", action="store_true", help="really request it")
    what.add_argument("--cancel", action="store_true", help="withdraw a pending request")
    p.add_argument(
        "--entry",
        default="pystate-factory-reset.efi",
        help="the reset entry's id (default pystate-factory-reset.efi: "
        "/EFI/Linux/pystate-factory-reset.efi)",
    )
    p.add_argument("--efivars", default=EFIVARS, help=f"efivarfs (default {EFIVARS})")
    p.set_defaults(func=_cmd_factory_reset)

    p = sub.add_parser("gpt", help="list a disk's GPT partitions, state partitions marked")
    p.add_argument("image", help="disk image file or block device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_gpt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # The initrd's two command lines, without argparse. argparse's --version prints the
    # same line and exits 0 (through SystemExit, as this does).
    if words == ["--version"]:
        print(_version())
        raise SystemExit(0)
    if words == ["boot"]:
        return _report(_boot, _boot_defaults())
    parser = _parser()
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help()
        return 2
    return _report(args.func, args)


def _report(func: Callable[[_T], int], args: _T) -> int:
    """``func(args)``, with every error turned into one line on stderr and exit status 1."""
    try:
        result: int = func(args)
    except PystateError as exc:
        print(f"pystate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Anything not already explained by a module: still one line, naming the file.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pystate: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line, not a traceback, on a boot console
        print(f"pystate: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return result
