"""A factory reset at boot (SPEC §6, §11.6; docs/factory-reset.md): what the machine holds,
the decision, and the reset's own steps.

``look()`` reads what formats/reset_decision.decide() needs: the word (the configuration),
the request variable and the boot loader's ``LoaderEntrySelected`` (efivarfs), the marker
and, beside a marker, encrypted.img's header. encrypted.setup() then runs the steps, in
this order, each a boot.json step, so that a power cut anywhere leaves a machine that the
next boot finishes or leaves alone, and never one that resets twice from one request:

- ``reset-begin``: (a) the marker ``/state/.pystate/factory-reset`` (file and directories
  fsynced), then (b) the request variable deleted, and ``LoaderEntryOneShot`` too if it still
  names the reset entry: from here on the request is consumed;
- ``factory-reset``: (c) ``cryptsetup erase`` of encrypted.img (every keyslot destroyed: no
  key, not the recovery key either, opens its data again), then the file deleted; (d) every
  plain entry on /state deleted;
- provisioning (initrd/provision.py: encrypted.img.new, then the rename) — (e);
- ``reset-end``: (f) the marker removed.

A boot that finds the marker finishes from (b) when (c) had begun (encrypted.img absent,
erased or not LUKS); beside an intact image the marker is removed and nothing is erased.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pystate_initrd.config import Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import efivar, luks2, names
from pystate_initrd.formats.reset_decision import (
    MARKER,
    Action,
    Decision,
    ImageState,
    Inputs,
    RequestSource,
    image_state,
    same_entry,
)
from pystate_initrd.initrd import provision
from pystate_initrd.log import Log
from pystate_initrd.report import BootReport
from pystate_initrd.system import beneath, efivars

# Enough bytes for both copies of any LUKS2 header (formats/luks2.py: 16 KiB to 4 MiB each).
_HEADER_BYTES = 2 * luks2.HEADER_SIZES[-1] + luks2.BINARY_SIZE


class FactoryResetError(PystateError):
    """A factory reset could not be started or finished."""


# --- the marker, through directory fds: /state is writable offline, nothing is followed ----


def _meta_fd(state_dir: Path, *, create: bool) -> int | None:
    try:
        return beneath.open_subdir(state_dir, names.META_DIR, create=create)
    except OSError as exc:
        if not create:
            return None  # not a directory pystate made: it holds no marker of pystate's
        raise FactoryResetError(
            f"{state_dir / names.META_DIR} is not a directory ({exc.strerror}); "
            "refusing to use it for the factory-reset marker; nothing was erased",
            hint="remove it from the emergency shell and reboot",
        ) from None


def marker_exists(state_dir: Path) -> bool:
    fd = _meta_fd(state_dir, create=False)
    if fd is None:
        return False
    try:
        os.lstat(names.RESET_MARKER, dir_fd=fd)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    return True


def write_marker(state_dir: Path, text: str) -> None:
    """(a): the marker, its data and its directory entry on disk before anything is erased."""
    fd = _meta_fd(state_dir, create=True)
    assert fd is not None
    try:
        with contextlib.suppress(FileNotFoundError):
            _remove_at(fd, names.RESET_MARKER)
        out = os.open(
            names.RESET_MARKER,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=fd,
        )
        try:
            os.write(out, text.encode("utf-8", errors="replace"))
            os.fsync(out)
        finally:
            os.close(out)
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except IsADirectoryError:
        import shutil  # here, not at the top: every boot imports this module (2 ms)

        shutil.rmtree(name, dir_fd=dir_fd)


def remove_marker(state_dir: Path) -> bool:
    """Delete the marker, whatever it is (never followed); whether there was one."""
    fd = _meta_fd(state_dir, create=False)
    if fd is None:
        return False
    try:
        _remove_at(fd, names.RESET_MARKER)
        os.fsync(fd)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    return True


# --- what the machine holds -------------------------------------------------------------------


def read_image_state(image: Path) -> ImageState:
    """encrypted.img as decide() needs it beside a marker; reads the header, runs nothing."""
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        return image_state(None)
    if not stat.S_ISREG(st.st_mode):
        return image_state(b"", regular=False)
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.read(fd, _HEADER_BYTES)
    finally:
        os.close(fd)
    return image_state(data)


def _read_efi(
    read: Callable[[Path, str], str | None], directory: Path, file: str
) -> tuple[str | None, str | None]:
    """(value, None), (None, None) when absent, or (None, why) when it cannot be read."""
    try:
        value = read(directory, file)
    except (efivars.EfiVarsError, efivar.EfiVarError) as exc:
        return None, str(exc)
    return value, None


def look(cfg: Config, state_dir: Path, efivars_dir: Path) -> Inputs:
    """Everything decide() needs, read from the configuration, efivarfs and /state."""
    marker = marker_exists(state_dir)
    image = read_image_state(state_dir / names.IMAGE) if marker else None
    if cfg.factory_reset_request is RequestSource.NONE:  # no EFI variable is read
        return Inputs(word=cfg.factory_reset, source=RequestSource.NONE, marker=marker, image=image)
    efi = efivars.available(efivars_dir)
    request = request_error = selected = selected_error = None
    if efi:
        request, request_error = _read_efi(
            efivars.read_string, efivars_dir, efivar.FACTORY_RESET_REQUEST
        )
        if request == "":
            request, request_error = None, "it names no boot entry"
        if request is not None or cfg.factory_reset:
            selected, selected_error = _read_efi(
                efivars.read_string, efivars_dir, efivar.LOADER_ENTRY_SELECTED
            )
    return Inputs(
        word=cfg.factory_reset,
        source=RequestSource.EFI_VARIABLE,
        request=request,
        request_error=request_error,
        selected=selected,
        selected_error=selected_error,
        efi=efi,
        marker=marker,
        image=image,
    )


def facts(i: Inputs, d: Decision) -> dict[str, Any]:
    """boot.json's ``factory_reset`` object."""
    return {
        "action": str(d.action),
        "reason": d.reason,
        "word": i.word,
        "source": str(i.source),
        "request": i.request,
        "selected": i.selected,
        "marker": i.marker,
        "image": None if i.image is None else str(i.image),
        "warnings": list(d.warnings),
        "notes": list(d.notes),
    }


def relevant(i: Inputs) -> bool:
    """Whether there is anything to say: a word, a request (readable or not), a marker."""
    return i.word or i.marker or i.request is not None or i.request_error is not None


# --- the steps --------------------------------------------------------------------------------


def consume_request(efivars_dir: Path, i: Inputs, log: Log) -> str:
    """(b): delete the request, and LoaderEntryOneShot while it still names the reset entry
    (systemd-boot deletes it when it reads it; another boot loader may not). EfiVarsError
    when the request cannot be deleted."""
    if i.source is RequestSource.NONE or not efivars.available(efivars_dir):
        return "no request to consume"
    deleted = efivars.delete(efivars_dir, efivar.FACTORY_RESET_REQUEST)
    detail = f"request {efivar.FACTORY_RESET_REQUEST} " + ("deleted" if deleted else "absent")
    if i.request is not None:
        oneshot, error = _read_efi(efivars.read_string, efivars_dir, efivar.LOADER_ENTRY_ONESHOT)
        if oneshot is not None and same_entry(oneshot, i.request):
            try:
                efivars.delete(efivars_dir, efivar.LOADER_ENTRY_ONESHOT)
                detail += f"; {efivar.LOADER_ENTRY_ONESHOT} deleted"
            except efivars.EfiVarsError as exc:
                log.warning(str(exc))
        elif error is not None:
            log.warning(f"{error}; left alone")
    return detail


def begin(state_dir: Path, efivars_dir: Path, i: Inputs, d: Decision, report: BootReport) -> None:
    """(a) and (b), as the step ``reset-begin``."""
    with report.step("reset-begin") as s:
        if d.action is Action.RESET:
            write_marker(state_dir, f"pystate factory reset under way: {d.reason}\n")
            marker = f"marker {MARKER} written"
        else:
            marker = f"marker {MARKER} found: finishing the reset"
        try:
            consumed = consume_request(efivars_dir, i, report.log)
        except efivars.EfiVarsError as exc:
            if d.action is Action.FINISH:
                # The erase already happened: stopping would not undo it.
                report.log.warning(f"{exc}; the reset goes on")
                consumed = "the request could not be deleted"
            else:
                remove_marker(state_dir)  # nothing was erased: leave no marker behind
                raise FactoryResetError(
                    f"{exc}: the factory-reset request cannot be consumed, so the reset would "
                    "not be one-shot; nothing was erased",
                    hint="boot normally, run `pystate factory-reset --cancel`, and request the "
                    "reset again",
                ) from None
        s.detail = f"{marker}; {consumed}"


def crypto_erase(state_dir: Path) -> str:
    """(c): destroy every keyslot of encrypted.img, then delete it; what was done."""
    image = state_dir / names.IMAGE
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        return f"no {names.IMAGE}"
    if stat.S_ISDIR(st.st_mode):
        import shutil  # here, not at the top: every boot imports this module (2 ms)

        shutil.rmtree(image)
        done = f"{names.IMAGE} was a directory: deleted"
    else:
        done = f"{names.IMAGE} deleted"
        if stat.S_ISREG(st.st_mode):
            if provision.crypto_erase(image):
                done = f"{names.IMAGE}: every keyslot destroyed (cryptsetup erase), deleted"
            else:
                done = f"{names.IMAGE} is not LUKS: nothing to erase, deleted"
        os.unlink(image)
    provision.fsync_dir(state_dir)
    return done


def delete_plain(state_dir: Path) -> list[str]:
    """(d): delete every plain entry (names starting with '.' and the reserved ones stay)."""
    gone = []
    for entry in os.scandir(state_dir):
        if entry.name.startswith(".") or entry.name in names.RESERVED_PLAIN:
            continue
        if entry.is_dir(follow_symlinks=False):
            import shutil  # here, not at the top: every boot imports this module (2 ms)

            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        gone.append(entry.name)
    provision.fsync_dir(state_dir)
    return sorted(gone)


def destroy(state_dir: Path, report: BootReport) -> list[str]:
    """(c) and (d), as the step ``factory-reset`` (the name it has always had in boot.json);
    the plain entries removed."""
    with report.step("factory-reset") as s:
        erased = crypto_erase(state_dir)
        gone = delete_plain(state_dir)
        s.detail = f"{erased}; plain entries removed: " + (", ".join(gone) or "none")
    return gone


def end(state_dir: Path, report: BootReport) -> None:
    """(f), as the step ``reset-end``: the reset is complete."""
    with report.step("reset-end") as s:
        remove_marker(state_dir)
        s.detail = f"marker {MARKER} removed: factory reset complete"
