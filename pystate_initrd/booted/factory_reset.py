"""``pystate factory-reset``: request a factory reset for the next boot (SPEC §11.6).

A reset is one-shot: this command writes the request, and the initrd honours
``pystate.factory-reset=1`` only with it (formats/reset_decision.py, docs/factory-reset.md).
Two EFI variables, both UTF-16LE NUL-terminated strings with the attributes
NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS (0x7):

- ``PystateFactoryReset-8d901e04-0f5c-45b8-9bac-ca374402d770``: the reset entry's id — the
  request, deleted by the initrd before it erases anything;
- ``LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f``: the same id, as
  ``bootctl set-oneshot`` writes it: systemd-boot boots that entry once, and deletes it.

The entry is ``pystate-factory-reset.efi`` (a second UKI, /EFI/Linux/pystate-factory-reset.efi,
whose own command line has the word) unless ``--entry`` names another; where systemd-boot lists
its entries (``LoaderEntries``) an id it does not list is refused. Without ``--yes`` nothing is
changed: the command says what it would do and exits with status 2. ``--cancel`` withdraws the
request (and the one-shot entry while it names the reset entry).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import efivar
from pystate_initrd.formats.reset_decision import same_entry
from pystate_initrd.system import efivars

DEFAULT_ENTRY = "pystate-factory-reset.efi"
EXIT_NOT_ARMED = 2  # without --yes: nothing was changed
MAX_ENTRY_CHARS = 255


class FactoryResetRequestError(PystateError):
    """The factory-reset request cannot be made or withdrawn."""


@dataclass(frozen=True)
class Pending:
    """What the EFI variables hold now (``None``: absent); the errors of unreadable ones."""

    request: str | None
    oneshot: str | None
    entries: list[str] | None
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "request": self.request,
            "oneshot": self.oneshot,
            "entries": self.entries,
            "errors": list(self.errors),
        }


def no_efi(directory: Path) -> FactoryResetRequestError:
    return FactoryResetRequestError(
        f"no EFI variables at {directory}: this machine did not boot through UEFI (or efivarfs "
        "is not mounted), so a factory reset cannot be requested; nothing was changed",
        hint="with a boot loader that has its own one-shot entries (grub-reboot), see "
        "docs/factory-reset.md: [state] factory-reset-request = none",
    )


def read_pending(directory: Path) -> Pending:
    """The request, the one-shot entry and systemd-boot's entries, as they are now."""
    errors = []
    values: list[Any] = []
    for read, file in (
        (efivars.read_string, efivar.FACTORY_RESET_REQUEST),
        (efivars.read_string, efivar.LOADER_ENTRY_ONESHOT),
        (efivars.read_list, efivar.LOADER_ENTRIES),
    ):
        try:
            values.append(read(directory, file))
        except (efivars.EfiVarsError, efivar.EfiVarError) as exc:
            errors.append(str(exc))
            values.append(None)
    return Pending(values[0], values[1], values[2], tuple(errors))


def check_entry(entry: str, entries: list[str] | None) -> str:
    """The entry id to write: as systemd-boot spells it when it lists its entries (it
    lowercases ids); FactoryResetRequestError for an id it does not list."""
    if (
        not entry
        or len(entry) > MAX_ENTRY_CHARS
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in entry)
    ):
        raise FactoryResetRequestError(
            f"--entry {entry!r} is not a boot entry id (1 to {MAX_ENTRY_CHARS} characters, "
            "no control characters); nothing was changed"
        )
    if entries is None:
        return entry
    for known in entries:
        if same_entry(known, entry):
            return known
    listed = ", ".join(repr(e) for e in entries) or "none"
    raise FactoryResetRequestError(
        f"boot entry {entry!r} is not one of the boot loader's entries (LoaderEntries: "
        f"{listed}); nothing was changed",
        hint=f"install the reset entry as /EFI/Linux/{DEFAULT_ENTRY} on the ESP "
        "(docs/factory-reset.md), or name a listed one with --entry",
    )


def next_boot(entry: str) -> str:
    """What the next boot does once the request is made."""
    return (
        f"At the next boot the boot loader starts entry {entry!r} once, and pystate in the "
        "initrd resets the state partition: it crypto-erases /state/encrypted.img (every "
        "keyslot destroyed: everything in it, /etc and /var by default, is gone for good, and "
        "the recovery key no longer opens it), deletes every plain entry on /state (/home by "
        "default), and makes a new encrypted.img with a new recovery key. The boots after it "
        "start the default entry again."
    )


def request(directory: Path, entry: str, *, yes: bool, out: list[str]) -> int:
    """Make the request (yes), or say what it would be; the exit status."""
    if not efivars.available(directory):
        raise no_efi(directory)
    now = read_pending(directory)
    entry = check_entry(entry, now.entries)
    if now.entries is None:
        out.append(
            "note: the boot loader does not list its entries (no LoaderEntries variable: not "
            f"systemd-boot?), so {entry!r} is not checked; a boot loader that does not honour "
            "LoaderEntryOneShot will not start it by itself: pick it in the boot menu"
        )
    out.extend(f"note: {error}" for error in now.errors)
    if now.request is not None:
        out.append(f"a factory reset is already requested, for boot entry {now.request!r}")
    if now.oneshot is not None and not same_entry(now.oneshot, entry):
        out.append(f"the one-shot boot entry is {now.oneshot!r} now; it would be replaced")
    changes = [
        f"  {efivar.FACTORY_RESET_REQUEST} = {entry!r}  (the request)",
        f"  {efivar.LOADER_ENTRY_ONESHOT} = {entry!r}  (boot that entry once)",
    ]
    if not yes:
        out.append("Nothing was changed. With --yes, pystate factory-reset sets:")
        out.extend(changes)
        out.append(next_boot(entry))
        out.append("Run `pystate factory-reset --yes` (as root) to request it, then reboot.")
        return EXIT_NOT_ARMED
    efivars.write_string(directory, efivar.FACTORY_RESET_REQUEST, entry)
    try:
        efivars.write_string(directory, efivar.LOADER_ENTRY_ONESHOT, entry)
    except efivars.EfiVarsError:
        efivars.delete(directory, efivar.FACTORY_RESET_REQUEST)  # all or nothing
        raise
    out.append("Factory reset requested:")
    out.extend(changes)
    out.append(next_boot(entry))
    out.append("Reboot to reset; `pystate factory-reset --cancel` withdraws the request.")
    return 0


def cancel(directory: Path, entry: str, out: list[str]) -> int:
    """Withdraw the request, and the one-shot entry while it names the reset entry."""
    if not efivars.available(directory):
        raise no_efi(directory)
    now = read_pending(directory)
    out.extend(f"note: {error}" for error in now.errors)
    reset_entry = now.request if now.request is not None else entry
    changed = False
    if efivars.delete(directory, efivar.FACTORY_RESET_REQUEST):
        which = f" for boot entry {now.request!r}" if now.request is not None else ""
        out.append(f"withdrew the factory-reset request{which} ({efivar.FACTORY_RESET_REQUEST})")
        changed = True
    if now.oneshot is not None:
        if same_entry(now.oneshot, reset_entry):
            efivars.delete(directory, efivar.LOADER_ENTRY_ONESHOT)
            out.append(f"removed the one-shot boot entry {now.oneshot!r} (LoaderEntryOneShot)")
            changed = True
        else:
            out.append(
                f"the one-shot boot entry is {now.oneshot!r}, not the reset entry: left alone"
            )
    if not changed:
        out.append("no factory reset was requested; nothing was changed")
    else:
        out.append("The next boot is a normal one: nothing will be reset.")
    return 0


def cmd_factory_reset(args: argparse.Namespace) -> int:
    directory = Path(args.efivars)
    out: list[str] = []
    try:
        if args.cancel:
            return cancel(directory, args.entry, out)
        return request(directory, args.entry, yes=args.yes, out=out)
    finally:
        for line in out:
            print(line)
