"""Whether this boot factory-resets, and why (pure; SPEC §6, §11.6; docs/factory-reset.md).

A factory reset is one-shot. ``pystate factory-reset`` in the booted system writes a request
(the EFI variable ``PystateFactoryReset-<pystate guid>``, holding the reset entry's id) and
makes that entry systemd-boot's one-shot entry; the entry's command line has
``pystate.factory-reset=1``. The initrd resets only when both are there, and when the entry
systemd-boot says it booted (``LoaderEntrySelected``), if it says, is the requested one. The
word alone (a persistent command line) resets nothing: it is a warning.

``[state] factory-reset-request = none`` trusts the word alone, for boot loaders with their
own one-shot entries on machines without EFI variables (the distributor's risk).

A reset writes a marker on /state first. A boot that finds the marker finishes the reset when
the destructive step already happened (encrypted.img absent, erased, or not LUKS); a marker
beside an intact encrypted.img was not left by a reset in progress past its erase (the
partition is writable offline: SPEC §9), so it is removed and nothing is erased.

``decide()`` is the whole rule, from what the I/O found (initrd/factory_reset.py reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pystate_initrd.formats import luks2
from pystate_initrd.formats.efivar import FACTORY_RESET_REQUEST, LOADER_ENTRY_SELECTED
from pystate_initrd.formats.names import IMAGE, META_DIR, RESET_MARKER

WORD = "pystate.factory-reset=1"
MARKER = f"{META_DIR}/{RESET_MARKER}"  # under /state
WORD_IGNORED = (
    f"{WORD} ignored: no reset was requested on this machine with `pystate factory-reset`; "
    "a factory reset comes from a one-shot boot entry (SPEC §11.6)"
)


class RequestSource(StrEnum):
    """Where the one-shot request comes from: ``[state] factory-reset-request``."""

    EFI_VARIABLE = "efi-variable"  # `pystate factory-reset` writes it (the default)
    NONE = "none"  # no request: the word alone resets (grub-reboot and the like)


class ImageState(StrEnum):
    """encrypted.img as a reset sees it (looked at only beside a marker)."""

    ABSENT = "absent"
    ERASED = "erased"  # a LUKS2 header with no keyslot left: cryptsetup erase ran
    NOT_LUKS = "not LUKS"  # no LUKS header at all
    INTACT = "intact"  # keyslots, or a header pystate cannot read: not provably erased


def image_state(data: bytes | None, *, regular: bool = True) -> ImageState:
    """encrypted.img's state from its first bytes (both LUKS2 header copies: twice 4 MiB, plus 4 KiB
    covers every header size); None: there is no file. Something other than a regular file
    is INTACT: never treated as erased."""
    if data is None:
        return ImageState.ABSENT
    if not regular:
        return ImageState.INTACT
    try:
        header = luks2.parse_luks2_header(data)
    except luks2.NotLuks:
        # A damaged header still has its keyslots' bytes behind it: not erased.
        return ImageState.INTACT if luks2.has_luks_magic(data) else ImageState.NOT_LUKS
    return ImageState.INTACT if header.metadata["keyslots"] else ImageState.ERASED


class Action(StrEnum):
    BOOT = "boot"  # no reset: unlock (or provision) as at any boot
    RESET = "reset"  # a requested reset: marker, request deleted, erase, delete, provision
    FINISH = "finish"  # a reset cut short after its erase: the same steps, to the end


@dataclass(frozen=True)
class Inputs:
    """What the initrd found; the request and the entry only with ``RequestSource.EFI_VARIABLE``."""

    word: bool  # pystate.factory-reset=1 on the kernel command line
    source: RequestSource = RequestSource.EFI_VARIABLE
    request: str | None = None  # the request's entry id; None: no request
    request_error: str | None = None  # the request variable exists but cannot be read
    selected: str | None = None  # LoaderEntrySelected; None: the boot loader does not say
    selected_error: str | None = None  # LoaderEntrySelected exists but cannot be read
    efi: bool = True  # whether there are EFI variables at all (efivarfs)
    marker: bool = False  # /state/.pystate/factory-reset exists
    image: ImageState | None = None  # encrypted.img, when there is a marker


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # one line: boot.json, and the log when something happens
    warnings: tuple[str, ...] = ()  # each a warning line in the log and boot.json
    notes: tuple[str, ...] = ()  # each an info line: a pending request, say
    drop_marker: bool = False  # a marker beside an intact image: removed, nothing erased

    @property
    def resets(self) -> bool:
        return self.action is not Action.BOOT


def same_entry(a: str, b: str) -> bool:
    """systemd-boot lowercases its entry ids; bootctl and people may not."""
    return a.casefold() == b.casefold()


def decide(i: Inputs) -> Decision:
    """Reset, finish a reset, or boot as usual; with the reason and what to tell the log."""
    warnings: list[str] = []
    notes: list[str] = []
    drop_marker = False

    if i.marker:
        if i.image is None:
            raise ValueError("a marker needs the image's state")
        if i.image is not ImageState.INTACT:
            return Decision(
                Action.FINISH,
                f"a factory reset was cut short ({MARKER} exists, {IMAGE} {i.image}): "
                "finishing it",
            )
        drop_marker = True
        warnings.append(
            f"{MARKER} exists beside an intact {IMAGE} (keyslots left): no reset was cut "
            "short after its erase (either the marker was not made by pystate, or a reset was "
            "cut before it erased anything); marker removed, nothing erased"
        )

    def boot(reason: str) -> Decision:
        return Decision(Action.BOOT, reason, tuple(warnings), tuple(notes), drop_marker)

    def reset(reason: str) -> Decision:
        return Decision(Action.RESET, reason, tuple(warnings), tuple(notes), drop_marker)

    if i.source is RequestSource.NONE:
        if i.word:
            return reset(f"{WORD} ([state] factory-reset-request = none: the word alone)")
        return boot(f"no {WORD}")

    if i.request_error is not None:
        warnings.append(
            f"the factory-reset request {FACTORY_RESET_REQUEST} cannot be read: "
            f"{i.request_error}; ignored (`pystate factory-reset --cancel` removes it)"
        )
    selected = f"entry {i.selected!r}" if i.selected is not None else "its entry"

    if not i.word:
        if i.request is not None:
            notes.append(
                f"a factory reset is pending for boot entry {i.request!r}; this boot ({selected}) "
                f"has no {WORD}, so nothing was reset: it stays pending (boot that entry to "
                "reset, or withdraw it with `pystate factory-reset --cancel`)"
            )
        return boot(f"no {WORD}")

    if i.request is None:
        hint = (
            ""
            if i.efi
            else " (no EFI variables here: not a UEFI boot, or efivarfs is not mounted; a "
            "boot loader with its own one-shot entries needs [state] factory-reset-request = "
            "none, docs/factory-reset.md)"
        )
        warnings.append(WORD_IGNORED + hint)
        return boot(WORD_IGNORED)
    if i.selected_error is not None:
        message = (
            f"{WORD} ignored: the boot loader's {LOADER_ENTRY_SELECTED} cannot be read "
            f"({i.selected_error}), so this boot's entry is not known to be the requested "
            f"{i.request!r}; the request stays pending"
        )
        warnings.append(message)
        return boot(message)
    if i.selected is not None and not same_entry(i.selected, i.request):
        message = (
            f"{WORD} ignored: the reset was requested for boot entry {i.request!r}, but this "
            f"boot's entry is {i.selected!r} (LoaderEntrySelected); the request stays pending"
        )
        warnings.append(message)
        return boot(message)
    booted = (
        f"booted entry {i.selected!r}"
        if i.selected is not None
        else "the boot loader does not say which entry it booted"
    )
    return reset(f"{WORD} and the request for boot entry {i.request!r} ({booted})")
